"""The CUDA paths users run (skipped without a GPU; `tools/gpu_check.sh` runs them): the joint
loop end to end with the Mistake Log replayed (the step that crashed on a GPU), decoding and
evaluation on CUDA equal to the same models on the CPU, and exact resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import launch, sample_prompts, tiny_copilot, tiny_pilot, tokenized_batch

pytestmark = [pytest.mark.gpu]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")

SHORT = ("base.enabled=false", "copilot.init_from=none", "model.init_from_base=false",
         "data.train_size=400", "data.val_size=16", "data.test_size=16", "train.steps=8",
         "train.log_every=2", "train.pilot.micro_batch_size=8", "mistake_log.replay_size=8",
         "train.pilot.warmup_steps=2", "train.copilot.warmup_steps=2", "eval.batch_size=16",
         "eval.lambdas=[1.0]", "tracking.enabled=false")


def _models():
    pilot, tok = tiny_pilot(seed=3)
    cop = tiny_copilot(pilot.config.vocab_size, pilot.config.hidden_size, randomize_head=True)
    return pilot, cop, tok


def test_decoding_on_cuda_equals_cpu():
    from tcp.evaluation.decoding import DecodeOptions, fused_generate
    from tcp.models.pilot import PilotTap

    pilot, cop, tok = _models()
    out = {}
    for dev in (CPU, CUDA):
        p, c = copy.deepcopy(pilot).to(dev), copy.deepcopy(cop).to(dev)
        for strategy in ("greedy", "beam"):  # beam: runs on CUDA (near-ties may differ)
            out[dev.type, strategy], _ = fused_generate(
                p, PilotTap(p), c, sample_prompts(tok), lambdas=[0.0, 1.0], eos_id=-1,
                pad_id=tok.pad_token_id, device=dev,
                opts=DecodeOptions(max_new_tokens=6, strategy=strategy, num_beams=2))
    assert out["cuda", "greedy"] == out["cpu", "greedy"]
    assert [len(r) for r in out["cuda", "beam"]] == [len(r) for r in out["cpu", "beam"]]


def test_teacher_forced_diagnostics_on_cuda_equal_cpu():
    from tcp.evaluation.diagnostics import teacher_forced_diagnostics
    from tcp.models.lm_head import use_fused_head
    from tcp.models.pilot import PilotTap

    pilot, cop, tok = _models()
    samples = tokenized_batch(tok, n=8)
    got = {}
    for dev in (CPU, CUDA):
        p, c = copy.deepcopy(pilot).to(dev), copy.deepcopy(cop).to(dev)
        use_fused_head(p)
        got[dev.type] = teacher_forced_diagnostics(
            p, PilotTap(p), c, samples, pad_id=tok.pad_token_id, topk=8, lambdas=[1.0],
            fusion="probs", batch_size=4, rank=0, world=1, device=dev)
    for key in ("copilot_rmse", "zero_rmse", "cosine"):
        assert got["cuda"][key] == pytest.approx(got["cpu"][key], rel=1e-3), key


@pytest.mark.slow
def test_joint_run_on_cuda_replays_the_log_and_resumes_exactly(tmp_path: Path):
    # Replay starts at step 1 (window [t - W, t)): every step after the first joins replayed
    # entries read from the store (host) with the current step's (GPU).
    full = tmp_path / "full"
    launch(full, *SHORT, "checkpoint.every=4", ranks=1, timeout=600)
    res = json.loads((full / "results.json").read_text())
    assert res["history"][-1]["copilot_rmse"] < 1e3
    assert res["mistake_log"]["ranks"][0]["committed_entries"] == 8 * 8
    # Resume from step 4 into a copy: ends where the uninterrupted run ends.
    import shutil

    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "results.json").unlink()
    shutil.rmtree(part / "final")
    proc = launch(part, *SHORT, f"resume={part / 'checkpoints' / 'step_00000004'}", ranks=1,
                  timeout=600)
    assert "resumed from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    a = json.loads((full / "results.json").read_text())["history"]
    b = json.loads((part / "results.json").read_text())["history"]
    assert b[-1]["step"] == 8 and (part / "final" / "copilot.pt").is_file()
    for x, y in zip(a, b, strict=True):
        for key in ("pilot_loss", "copilot_rmse"):
            assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (x["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/llama3.2-3b+1b.yaml", "configs/qwen2.5-7b+0.5b.yaml"])
def test_paper_config_twin_with_lora_in_bf16_on_cuda(tmp_path: Path, config: str):
    """The paper's setting on a GPU: LoRA adapters beside a bf16 base under ZeRO-3, the GQA
    Copilot from its source, Triton kernels, merged save and tcp-eval (on shape twins)."""
    from tests.distributed.test_paper_twins import run_twin

    run_twin(tmp_path, config, "model.dtype=bfloat16", "kernels.impl=auto", ranks=1)
