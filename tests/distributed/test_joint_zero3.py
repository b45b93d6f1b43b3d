"""Real DeepSpeed: 2 CPU ranks (gloo), both engines ZeRO-3, a few joint steps end to end."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import SMALL, unexplained_console_lines
from tests.helpers import launch as _launch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(tmp_path: Path, *overrides: str, timeout: int = 400):
    return _launch(tmp_path / "run", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                   *overrides, timeout=timeout)


def test_two_rank_zero3_joint_run(joint_run):
    proc, run = joint_run.proc, joint_run.path  # trained once per session (conftest.py)
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2
    assert res["zero3_partitioned"] == {"pilot": True, "copilot": True}
    hist = res["history"]
    assert len(hist) == 4
    for key in ("pilot_loss", "copilot_rmse", "zero_rmse"):
        assert all(abs(r[key]) < 1e3 for r in hist), key
    assert hist[-1]["pilot_loss"] < hist[0]["pilot_loss"]
    assert hist[-1]["copilot_rmse"] < hist[0]["copilot_rmse"]
    assert 0 <= res["pilot"]["accuracy"] <= 1
    assert res["pilot+copilot"]["lambda"] in (0.0, 0.5, 1.0)  # 0: the Copilot did not help
    tf = res["validation"]["teacher_forced"]
    assert tf["tokens"] > 0 and tf["zero_rmse"] > 0
    # the table is printed with the budget used and the truncated share, and the run directory
    # holds what the README promises
    assert "Pilot+Copilot" in proc.stdout
    # every phase ran (base model trained and saved, engines, a new MLflow database, decoding,
    # final save): no third-party line beyond the runner's, which the README explains
    assert unexplained_console_lines(proc.stdout + proc.stderr) == []
    budget = res["decoding"]["max_new_tokens"]
    b = res["decoding"]["budget"]
    assert b["requested"] == "auto" and b["splits"] == ["train", "validation"]
    assert budget == b["longest_answer"] + 1 >= 2  # the longest numeric answer + EOS
    assert f"eval.max_new_tokens=auto -> {budget}" in proc.stdout
    assert "generations cut at the budget" in proc.stdout
    assert 0 <= res["truncation"]["test"]["share"] <= 1
    # predictions.jsonl: every rank's shard, one line per test example with both decodes; the
    # paired test counts all of them, as the accuracies do
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in preds] == list(range(32))
    assert {r["pilot+copilot"]["lambda"] for r in preds} == {res["pilot+copilot"]["lambda"]}
    paired = res["paired"]
    for key, name in (("pilot", "pilot_correct"), ("pilot+copilot", "copilot_correct")):
        assert sum(r[key]["correct"] for r in preds) == paired[name] == round(
            res[key]["accuracy"] * 32), key
    assert paired["n"] == 32 and "paired test" in proc.stdout
    for rel in ("config.yaml", "deepspeed.json", "tokenizer/tokenizer.json",
                "final/pilot/config.json", "final/copilot.pt", "plots/training.png",
                "plots/lambda_sweep.png", "plots/rectification.png", "checkpoints/latest",
                "checkpoints/step_00000024/manifest.json",
                "checkpoints/step_00000024/pilot/latest",
                "checkpoints/step_00000024/copilot/step_00000024",
                "checkpoints/step_00000024/trainer_rank0.pt",
                "checkpoints/step_00000024/trainer_rank1.pt"):
        assert (run / rel).exists(), rel
    assert joint_run.db.exists()
    check_mistake_log(run, res, steps=24, micro_batch_size=8)
    # tcp-eval on the finished run (one process, no DeepSpeed) scores what the job scored; batches
    # are composed differently (rank shards), so a near-tie may flip one answer.
    from tcp.cli.tcp_eval import eval_main

    lam = res["pilot+copilot"]["lambda"]
    assert eval_main([str(run), "--lambda", str(lam)]) == 0
    ev = json.loads((run / "eval/eval.json").read_text())
    assert ev["test_size"] == res["test_size"] == 32
    for key in ("pilot", "pilot+copilot"):
        assert abs(ev[key]["accuracy"] - res[key]["accuracy"]) <= 1 / 32, key
    assert ev["decoding"]["max_new_tokens"] == budget  # sized from the same train/validation
    if lam > 0:  # at λ = 0 the job traced its best λ > 0, which --lambda 0 does not know
        assert ev["rectification"]["prompt"] == res["rectification"]["prompt"]


def check_mistake_log(run: Path, res: dict, *, steps: int, micro_batch_size: int) -> None:
    """The default Zarr backend: it verifies, and each rank's shard holds exactly the entries
    that rank produced (one per sample of its micro-batch, every step, in order)."""
    from tcp.data.collate import batch_indices
    from tcp.mistake_log.maintenance import verify
    from tcp.mistake_log.reader import RankStoreReader

    rep = verify(run / "mistake_log")
    assert rep.ok, rep.summary()
    assert [r.rank for r in rep.ranks] == [0, 1]
    residual: dict[int, dict[int, float]] = {}
    train = res["data"]["train"]
    assert train["kept"] == train["total"]  # so sample ids are dataset indices
    for rank in (0, 1):
        rd = RankStoreReader(run / "mistake_log", rank)
        got = rd.read_range(0, rd.num_entries)
        want_steps, want_ids = [], []
        for step in range(steps):
            ids = batch_indices(seed=res["seed"], step=step, rank=rank, world_size=2,
                                micro_batch_size=micro_batch_size, num_samples=train["total"])
            want_steps += [step] * len(ids)
            want_ids += ids
        assert got.step.tolist() == want_steps
        assert got.sample_id.tolist() == want_ids
        assert (got.rank == rank).all() and (got.loss > 0).all()
        assert (got.topk_probs.sum(-1) + got.residual - 1).abs().max() < 1e-4
        residual[rank] = residual_by_step(got)
    # The residual mass reported per logging interval is the mean over ranks and the
    # interval's steps of each step's mean over its logged tokens.
    every = res["history"][1]["step"] - res["history"][0]["step"]
    for row in res["history"]:
        window = range(int(row["step"] - every), int(row["step"]))
        want = sum(residual[r][s] for r in (0, 1) for s in window) / (2 * len(window))
        assert abs(row["residual_mass"] - want) < 1e-4, (row["step"], row["residual_mass"], want)
    for r in res["mistake_log"]["ranks"]:
        assert r["committed_entries"] == steps * micro_batch_size and r["dropped_entries"] == 0


def test_local_pretrained_pilot_and_jsonl_data(tmp_path):
    """The `model.name_or_path` path (as for meta-llama/... on a cluster) with a local folder."""
    sys.path.append(str(ROOT))  # after site-packages (tests/conftest.py)
    from tests.helpers import tiny_pilot

    model, tok = tiny_pilot(d=32, layers=2)
    model.save_pretrained(tmp_path / "pilot")
    tok.save_pretrained(tmp_path / "pilot")
    rows = [{"q": f"{i}+{i}=", "a": str(2 * i)} for i in range(60)]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    launch(tmp_path, f"model.name_or_path={tmp_path / 'pilot'}", "base.enabled=false",
           "copilot.init_from=none", "copilot.hidden_size=32", "copilot.intermediate_size=64",
           "copilot.num_layers=2", "data.source=jsonl", f"data.train_path={tmp_path}/train.jsonl",
           f"data.val_path={tmp_path}/val.jsonl", f"data.test_path={tmp_path}/test.jsonl",
           "data.prompt_field=q", "data.answer_field=a", "train.steps=4", "train.log_every=2",
           "eval.lambdas=[1.0]", "eval.batch_size=16", "tracking.enabled=false")
    res = json.loads((tmp_path / "run/results.json").read_text())
    assert res["zero3_partitioned"] == {"pilot": True, "copilot": True}
    assert res["test_size"] == 60


@pytest.mark.extended  # fused == eager: per kernel, and per gradient in test_fused_zero3
def test_fused_kernels_match_eager_step_for_step(tmp_path):
    """The joint run with the fused paths (Triton kernels, interpreted on CPU) and with the
    eager paths: per-step Pilot and Copilot losses agree within 1e-4 relative."""
    short = (*SMALL, "train.steps=8", "train.log_every=1", "eval.enabled=false",
             "checkpoint.every=0")
    hist = {}
    for name, over, env in (("eager", "kernels.fused=false", {}),
                            ("fused", "kernels.fused=true",
                             {"TCP_KERNELS": "triton", "TRITON_INTERPRET": "1"})):
        run = tmp_path / name
        _launch(run, f"tracking.uri=sqlite:///{tmp_path / name}.db", *short, over, env=env,
                timeout=400)
        hist[name] = json.loads((run / "results.json").read_text())["history"]
    assert len(hist["eager"]) == len(hist["fused"]) == 8
    for e, f in zip(hist["eager"], hist["fused"], strict=True):
        for key in ("pilot_loss", "copilot_rmse", "zero_rmse"):
            assert abs(e[key] - f[key]) <= 1e-4 * abs(e[key]) + 1e-7, (e["step"], key, e, f)


def test_t5_pilot_trains_and_decodes_under_zero3(tmp_path):
    """An encoder-decoder Pilot (tiny T5 from config) with the encoder-decoder Copilot: joint
    ZeRO-3 training, fused beam-search decoding in the job (33 validation prompts: the ranks
    get unequal shards and finish at different steps, and must not hang), tcp-eval after."""
    launch(tmp_path, *SMALL, "model.arch.family=t5", "base.enabled=false",
           "copilot.init_from=none", "eval.strategy=beam", "eval.num_beams=2",
           "data.val_size=33")
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert res["zero3_partitioned"] == {"pilot": True, "copilot": True}
    hist = res["history"]
    assert hist[-1]["pilot_loss"] < hist[0]["pilot_loss"]
    assert all(abs(r["copilot_rmse"]) < 1e3 for r in hist)
    assert res["test_size"] == 32 and res["validation"]["size"] == 33
    assert res["decoding"]["strategy"] == "beam" and len(res["rectification"]["steps"]) >= 1
    assert json.loads((run / "final/pilot/config.json").read_text())["is_encoder_decoder"]
    import torch

    state = torch.load(run / "final/copilot.pt", weights_only=True)
    assert any(".cross_attn." in k for k in state)  # the encoder-decoder Copilot
    from tcp.cli.tcp_eval import eval_main

    assert eval_main([str(run), "--lambda", "1.0", "--limit", "8"]) == 0
    assert json.loads((run / "eval/eval.json").read_text())["test_size"] == 8


def residual_by_step(batch) -> dict[int, float]:
    """Each step's mean residual mass over its logged target tokens."""
    tok_step = batch.step.repeat_interleave(batch.y_offsets.diff())
    return {int(s): float(batch.residual[tok_step == s].float().mean())
            for s in tok_step.unique()}
