"""Every shipped paper config, on its shape twins: the config as shipped (LoRA where it has it,
the GQA / T5 Copilot initialised from its same-family source, epochs, gradient checkpointing),
with `model.name_or_path` and `copilot.init_from` pointed at twins of the hub models (same
family and architecture flags, tiny, built from config) and the run made short. Two CPU ranks,
ZeRO-3, a few joint steps, then `tcp-eval` on the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tcp.config import load_config
from tests.helpers import ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PAPER_CONFIGS = {
    # bf16 as shipped: LoRA adapters beside 16-bit base weights under ZeRO-3
    "configs/llama3.2-3b+1b.yaml": (),
    # fp32, and both engines with gradient checkpointing (the Pilot's is on as shipped)
    "configs/qwen2.5-7b+0.5b.yaml": ("model.dtype=float32", "copilot.gradient_checkpointing=true"),
    "configs/flan-t5-small+small.yaml": (),
}

SHORT = ("data.train_size=96", "data.val_size=8", "data.test_size=8", "data.max_length=96",
         "train.epochs=0.25", "train.log_every=1", "train.pilot.micro_batch_size=4",
         "train.copilot.micro_batch_size=4", "train.pilot.grad_accum_steps=1",
         "train.pilot.adam=torch", "train.copilot.adam=torch", "train.pilot.warmup_steps=1",
         "train.copilot.warmup_steps=1", "train.pilot.zero.offload_optimizer=none",
         "mistake_log.replay_size=4", "eval.max_new_tokens=4", "eval.batch_size=8",
         "eval.num_beams=2", "eval.lambdas=[1.0]", "checkpoint.every=0",
         "tracking.enabled=false", "kernels.chunk_mib=1")


def run_twin(tmp_path: Path, config: str, *extra: str, ranks: int = 2) -> tuple[Path, Path]:
    """Launch `config` on shape twins of its models (short run); returns (run dir, Copilot
    source twin). Checks the run finished, trained jointly, saved and evaluated."""
    from transformers import AutoConfig

    from tcp.cli.tcp_eval import eval_main
    from tcp.data.tokenizer import build_char_tokenizer
    from tcp.models.twins import copilot_overrides, write_twin

    cfg = load_config(ROOT / config)
    tok = build_char_tokenizer()
    pilot = write_twin(cfg.model.name_or_path, tmp_path / "pilot_twin", tok)
    source = write_twin(cfg.copilot.init_from, tmp_path / "copilot_twin", tok, layers=3,
                        head_dim=4, seed=1)
    run = tmp_path / "run"
    proc = launch(run, f"model.name_or_path={pilot}", f"copilot.init_from={source}",
                  *copilot_overrides(AutoConfig.from_pretrained(source), layers=2), *SHORT,
                  *extra, config=config, timeout=600, ranks=ranks)
    assert f"Copilot initialised from {source}" in proc.stdout
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == ranks
    # train.epochs=0.25 of the kept samples at 4 per rank
    steps = math.ceil(0.25 * res["data"]["train"]["kept"] / (4 * ranks))
    assert steps >= 2 and [r["step"] for r in res["history"]] == list(range(1, steps + 1))
    assert all(r["copilot_rmse"] < 1e3 for r in res["history"])
    assert load_config(run / "config.yaml").train.steps == steps
    final = run / "final"
    assert (final / "pilot" / "config.json").is_file() and (final / "copilot.pt").is_file()
    lora = cfg.pilot.lora.enabled
    assert (final / "pilot_adapter" / "adapter_config.json").is_file() == lora
    if lora:  # merged: a plain HF folder, no adapter keys, trained adapters merged in
        from safetensors.torch import load_file

        merged = load_file(next((final / "pilot").glob("*.safetensors")))
        base = load_file(next(pilot.glob("*.safetensors")))
        assert merged.keys() == base.keys()
        q = next(k for k in merged if k.endswith("layers.0.self_attn.q_proj.weight"))
        assert not torch.equal(merged[q].float(), base[q].float())
        adapter = load_file(final / "pilot_adapter" / "adapter_model.safetensors")
        b = [v for k, v in adapter.items() if "lora_B" in k]
        assert b and all(v.shape[1] == cfg.pilot.lora.r for v in b)
        assert any(v.abs().max() > 0 for v in b)  # trained, and not saved empty
    assert eval_main([str(run), "--lambda", "1.0", "--limit", "4"]) == 0
    ev = json.loads((run / "eval" / "eval.json").read_text())
    assert ev["test_size"] == 4 and ev["validation"]["teacher_forced"]["tokens"] > 0
    return run, source


@pytest.mark.parametrize("config", list(PAPER_CONFIGS))
def test_paper_config_shape_twin_trains_jointly_and_evaluates(tmp_path: Path, config: str):
    from transformers import AutoConfig

    run, source = run_twin(tmp_path, config, *PAPER_CONFIGS[config])
    cfg = load_config(ROOT / config)
    if cfg.copilot.num_kv_heads is not None:  # the Copilot kept the source's grouped heads
        src = AutoConfig.from_pretrained(source)
        state = torch.load(run / "final" / "copilot.pt", weights_only=True)
        k_rows = next(v for k, v in state.items() if k.endswith("self_attn.k_proj.weight"))
        assert k_rows.shape[0] == src.num_key_value_heads * (src.hidden_size //
                                                             src.num_attention_heads)
