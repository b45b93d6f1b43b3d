"""Exact resume under real DeepSpeed (2 CPU ranks, ZeRO-3): a run killed with SIGKILL, killed
while writing a checkpoint, or stopped by SIGTERM, then resumed with resume=auto, ends where the
uninterrupted run ends: same sample order, same losses, same engine states, and a Mistake Log
holding every (step, sample) exactly once."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 8
TINY = ("base.enabled=false", "copilot.init_from=none", "model.init_from_base=false",
        "data.train_size=400", "data.val_size=16", "data.test_size=16",
        f"train.steps={STEPS}", "train.log_every=2", "checkpoint.every=4", "eval.enabled=false",
        "train.pilot.micro_batch_size=8", "mistake_log.replay_size=8",
        "train.pilot.warmup_steps=2", "train.copilot.warmup_steps=2")
# Tracking on resume is covered once here, and against a server in test_mlflow_server.py.
NO_MLFLOW = "tracking.enabled=false"


@pytest.fixture(scope="module")
def continuous(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("continuous") / "run"
    launch(run, *TINY)
    return run


def tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint object, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert [r["step"] for r in ra["history"]] == [r["step"] for r in rb["history"]]
    for x, y in zip(ra["history"], rb["history"], strict=True):
        for key in ("pilot_loss", "copilot_rmse", "zero_rmse"):
            assert abs(x[key] - y[key]) <= 1e-6, (x["step"], key, x[key], y[key])
    # Both engines: final weights, and every tensor of the DeepSpeed checkpoints (the ZeRO
    # optimizer partitions: fp32 master weights, Adam moments; the step counters).
    wa, wb = (load_file(r / "final/pilot/model.safetensors") for r in (a, b))
    ca, cb = torch.load(a / "final/copilot.pt"), torch.load(b / "final/copilot.pt")
    for sa, sb in ((wa, wb), (ca, cb)):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)
    tag = f"step_{STEPS:08d}"
    files = sorted((a / "checkpoints" / tag).glob(f"*/{tag}/*.pt"))
    assert len(files) >= 4  # per engine: model states + each rank's optimizer partition
    for fa in files:
        fb = b / fa.relative_to(a)
        ta = dict(tensors(torch.load(fa, map_location="cpu", weights_only=False)))
        tb = dict(tensors(torch.load(fb, map_location="cpu", weights_only=False)))
        assert ta.keys() == tb.keys(), fa.name
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=1e-6, msg=f"{fa.name}{k}")
    assert_same_log(a, b)


def assert_same_log(a: Path, b: Path) -> None:
    """Each rank's shard verifies, holds every (step, sample) once, in the continuous run's
    order, with identical contents (the manifests' per-array CRC32 digests are equal)."""
    from tcp.mistake_log.format import Manifest
    from tcp.mistake_log.maintenance import verify
    from tcp.mistake_log.reader import RankStoreReader

    for run in (a, b):
        assert verify(run / "mistake_log").ok
    for rank in (0, 1):
        ma, mb = (Manifest.read(r / f"mistake_log/rank{rank:05d}/manifest.json") for r in (a, b))
        ea, eb = (RankStoreReader(r / "mistake_log", rank) for r in (a, b))
        ba, bb = ea.read_range(0, ea.num_entries), eb.read_range(0, eb.num_entries)
        pairs = list(zip(bb.step.tolist(), bb.sample_id.tolist(), strict=True))
        assert len(pairs) == len(set(pairs)) == STEPS * 8
        assert pairs == list(zip(ba.step.tolist(), ba.sample_id.tolist(), strict=True))
        assert (ma.entries, ma.tokens, ma.prompt_rows) == (mb.entries, mb.tokens, mb.prompt_rows)
        assert ma.digests == mb.digests
        np.testing.assert_array_equal(ba.h.numpy(), bb.h.numpy())


def one_mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run}.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    assert len(runs) == 1
    return client, runs[0]


def test_sigkill_mid_run_then_resume_equals_continuous(tmp_path, continuous):
    run = tmp_path / "run"
    # Commit every step, so steps 5-6 are committed past the step-4 cursor when the kill comes
    # and the resume has to roll them back (with the default, they die uncommitted).
    every = "mistake_log.store.commit_every_steps=1"
    p = launch(run, *TINY, every, env={"TCP_FAULT_INJECT": "kill@step=6"}, check=False)
    assert p.returncode != 0 and not (run / "results.json").exists()
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000004"
    p = launch(run, *TINY, every, "resume=auto")
    assert "resumed from" in p.stdout and "step_00000004 at step 4" in p.stdout
    assert "Mistake Log entries past its cursor were dropped" in p.stdout  # steps 4..6 re-logged
    assert_same_run(continuous, run)
    client, r = one_mlflow_run(run)  # the resumed run re-attached to the same MLflow run
    assert r.data.tags["tcp.resumes"] == "1" and r.info.status == "FINISHED"
    # Steps 5-6 ran twice (before the kill and after the resume) but are logged once.
    steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "pilot_loss"))
    assert steps == [2, 4, 6, 8]
    assert r.data.params["train.steps"] == str(STEPS)


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, continuous):
    run = tmp_path / "run"
    p = launch(run, *TINY, NO_MLFLOW, env={"TCP_FAULT_INJECT": f"kill@checkpoint={STEPS}"},
               check=False)
    assert p.returncode != 0
    final = run / f"checkpoints/step_{STEPS:08d}"
    assert (final / "trainer_rank0.pt").exists() and not (final / "manifest.json").exists()
    p = launch(run, *TINY, NO_MLFLOW, "resume=auto")
    assert "step_00000004 at step 4" in p.stdout
    assert_same_run(continuous, run)


@pytest.mark.extended  # SIGTERM paths: tests/distributed/test_operations.py (runner, srun, ...)
def test_sigterm_saves_a_clean_checkpoint_and_exits_143(tmp_path, continuous):
    run = tmp_path / "run"
    # Only rank 1 gets the signal (during step 5); both ranks agree to stop after step 6.
    p = launch(run, *TINY, NO_MLFLOW, env={"TCP_FAULT_INJECT": "term@step=5:rank=1"},
               check=False)
    assert p.returncode == 143, p.stdout[-3000:]
    assert "stopped (signal 15) after step 6" in p.stdout
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000006"
    assert (run / "checkpoints/step_00000006/manifest.json").exists()
    from tcp.mistake_log.maintenance import verify

    rep = verify(run / "mistake_log")
    assert rep.ok and all(r.uncommitted_entries == 0 for r in rep.ranks)  # flushed
    p = launch(run, *TINY, NO_MLFLOW, "resume=auto")
    assert "step_00000006 at step 6" in p.stdout
    assert_same_run(continuous, run)


def test_a_dead_rank_takes_the_job_down(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    p = launch(run, *TINY, NO_MLFLOW, "train.collective_timeout_s=20",
               env={"TCP_FAULT_INJECT": "kill@step=3:rank=1"}, check=False, timeout=240)
    assert p.returncode != 0
    assert time.time() - t0 < 120  # not a hang (the launcher or the timeout ends rank 0)


def test_resume_with_another_world_size_fails_before_loading(tmp_path, continuous):
    t0 = time.time()
    p = launch(continuous, *TINY, NO_MLFLOW, "resume=auto", ranks=1, check=False)
    assert p.returncode != 0
    assert "written by 2 ranks, this launch has 1" in p.stdout + p.stderr
    assert "Pilot" not in p.stdout  # failed before any model was built
    assert time.time() - t0 < 120


def test_lora_run_resumes_exactly_from_adapter_only_checkpoints(tmp_path):
    """A LoRA Pilot: checkpoints hold the adapters, not the frozen base (rebuilt from its source
    on resume), and a run killed mid-way ends where the uninterrupted one ends."""
    lora = (*TINY, "pilot.lora.enabled=true", "pilot.lora.r=4", NO_MLFLOW)
    full, run = tmp_path / "full", tmp_path / "run"
    launch(full, *lora)
    p = launch(run, *lora, env={"TCP_FAULT_INJECT": "kill@step=6"}, check=False)
    assert p.returncode != 0 and not (run / "results.json").exists()
    p = launch(run, *lora, "resume=auto")
    assert "step_00000004 at step 4" in p.stdout
    ha, hb = (json.loads((r / "results.json").read_text())["history"] for r in (full, run))
    for x, y in zip(ha, hb, strict=True):
        for key in ("pilot_loss", "copilot_rmse"):
            assert abs(x[key] - y[key]) <= 1e-6, (x["step"], key)
    for rel in ("final/pilot/model.safetensors", "final/pilot_adapter/adapter_model.safetensors"):
        wa, wb = load_file(full / rel), load_file(run / rel)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    states = sorted((run / "checkpoints/step_00000008/pilot/step_00000008").glob(
        "*model_states.pt"))
    assert states
    for f in states:
        st = torch.load(f, map_location="cpu", weights_only=False)
        assert st.get("frozen_param_fragments") is None  # the base was not written


def test_copilot_tail_trains_the_copilot_against_a_pilot_that_no_longer_moves(tmp_path):
    """train.copilot_tail_steps: after the joint steps the Pilot runs forward only (its weights
    and optimizer state stay those of the last joint step) while its errors are still logged
    and the Copilot keeps training on them, on its own schedule over both phases."""
    run = tmp_path / "run"
    launch(run, *TINY, NO_MLFLOW, "train.steps=4", "train.copilot_tail_steps=4")
    res = json.loads((run / "results.json").read_text())
    assert [r["step"] for r in res["history"]] == [2, 4, 6, 8]
    assert all("copilot_rmse" in r for r in res["history"])
    ds = json.loads((run / "deepspeed.json").read_text())
    assert ds["pilot"]["scheduler"]["params"]["total_num_steps"] == 4
    assert ds["copilot"]["scheduler"]["params"]["total_num_steps"] == 8
    ckpt = run / "checkpoints"
    for engine, same in (("pilot", True), ("copilot", False)):
        files = sorted((ckpt / "step_00000004" / engine / "step_00000004").glob("*.pt"))
        assert len(files) >= 2, engine
        diffs = 0
        for fa in files:
            fb = ckpt / "step_00000008" / engine / "step_00000008" / fa.name
            ta = dict(tensors(torch.load(fa, map_location="cpu", weights_only=False)))
            tb = dict(tensors(torch.load(fb, map_location="cpu", weights_only=False)))
            assert ta.keys() == tb.keys(), fa.name
            diffs += sum(not torch.equal(ta[k], tb[k]) for k in ta)
        assert (diffs == 0) == same, (engine, diffs)
    from tcp.mistake_log.reader import RankStoreReader

    for rank in (0, 1):  # the tail's errors are logged like the joint steps'
        r = RankStoreReader(run / "mistake_log", rank)
        assert sorted(set(r.read_range(0, r.num_entries).step.tolist())) == list(range(8))
