"""The memory plan (tcp.training.memory_plan, printed by `--dry-run`) against what a real tiny Pilot
and Copilot hold on the CPU, ZeRO stage semantics with plain numbers, and the dry-run's output.

What is measured, in one process without DeepSpeed (world 1, stage-0 semantics, torch AdamW):
- parameters, gradients and AdamW states: the bytes of every parameter, `.grad` and optimizer
  state tensor after one step. The plan must match exactly (the per-parameter 0-d `step`
  counters, 4 bytes each, are not counted).
- activations: every tensor autograd saves for the backward during one forward
  (`torch.autograd.graph.saved_tensors_hooks`), once per storage, parameters excluded. That is
  the activation memory a forward leaves for its backward. Tolerance: 25% for LLaMA blocks and
  the Copilot (the formula follows their code; the margin absorbs library changes such as a
  different SDPA kernel or an extra cast); 35% under gradient checkpointing (the HF mask and
  rotary tables are held by the checkpoint's arguments, not saved, so they are planned but not
  measured here); 50% for T5, whose estimate is an upper bound over the prompt/answer split.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tcp.cli.tcp_train import parse_args, train_main
from tcp.config import RunConfig, load_config
from tcp.data.tokenizer import build_char_tokenizer
from tcp.mistake_log.record import MistakeBatch
from tcp.models.copilot import Copilot, ErrorTarget
from tcp.models.copilot_inputs import build_inputs
from tcp.models.lm_head import HeadOptions, use_fused_head
from tcp.models.pilot import PilotTap, build_model, pilot_forward
from tcp.training.memory_plan import EnginePlan, GiB, MemoryPlan, format_plan, plan
from tcp.training.memory_terms import copilot_batch_size, zero_lines

# data.max_length: the plan and the measured steps share one T (the default is auto).
SMALL = ["train.pilot.micro_batch_size=8", "mistake_log.replay_size=8", "data.max_length=96"]
T5 = ["model.arch.family=t5", "base.enabled=false", "copilot.init_from=none"]


def config(*overrides: str) -> RunConfig:
    return load_config("configs/default.yaml", [*SMALL, *overrides])


def line(en: EnginePlan, prefix: str) -> int:
    (x,) = [x for x in en.lines if x.name.startswith(prefix)]
    return x.device + x.host


class SavedBytes:
    """Bytes autograd saves for the backward inside the context (per storage, no parameters)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.seen[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def real_pilot(cfg: RunConfig, *, reentrant_checkpointing: bool = False) -> torch.nn.Module:
    model = build_model(cfg.model.arch, vocab_size=len(build_char_tokenizer()), pad_id=0, bos_id=1,
                        eos_id=2, seed=0).to(getattr(torch, cfg.model.dtype))
    if cfg.pilot.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lc = cfg.pilot.lora
        with warnings.catch_warnings():  # peft reads HF's deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha,
                                                     lora_dropout=lc.dropout,
                                                     target_modules=list(lc.target_modules)))
    if reentrant_checkpointing:  # reentrant: the kept layer inputs pass through the hooks
        kw = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()
    use_fused_head(model)
    return model


def pilot_step(cfg: RunConfig, model: torch.nn.Module) -> torch.Tensor:
    """The trainer's Pilot forward on a full-length batch (one padded token: HF builds its mask)."""
    B, T = cfg.train.pilot.micro_batch_size, cfg.data.max_length
    ids = torch.randint(4, 100, (B, T))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    batch = {"input_ids": ids, "attention_mask": mask,
             "prompt_len": torch.ones(B, dtype=torch.long),
             "target_len": torch.tensor([T - 2] + [T - 1] * (B - 1))}
    out = pilot_forward(model, PilotTap(model, impl="torch"), batch,
                        head=HeadOptions(topk=cfg.mistake_log.topk, impl="torch"))
    return out.loss


def real_copilot(cfg: RunConfig) -> Copilot:
    encdec = cfg.model.arch.family == "t5"
    return Copilot(cfg.copilot, vocab_size=100, pilot_hidden=cfg.model.arch.hidden_size,
                   encoder_decoder=encdec).to(getattr(torch, cfg.model.dtype))


def copilot_step(cfg: RunConfig, model: Copilot) -> torch.Tensor:
    """The trainer's Copilot forward on full-length entries (1 prompt row, T - 1 targets)."""
    E, T, k, d = copilot_batch_size(cfg), cfg.data.max_length, cfg.mistake_log.topk, \
        cfg.model.arch.hidden_size
    n = T - 1
    mb = MistakeBatch(
        x_tilde=torch.randn(E, d), x_offsets=torch.arange(E + 1), h=torch.randn(E * n, d),
        y_offsets=torch.arange(E + 1) * n, labels=torch.randint(0, 100, (E * n,)),
        topk_ids=torch.randint(0, 100, (E * n, k)), topk_probs=torch.rand(E * n, k) / k,
        residual=torch.rand(E * n), step=torch.zeros(E, dtype=torch.long),
        sample_id=torch.arange(E), rank=torch.zeros(E, dtype=torch.long), loss=torch.rand(E))
    target = ErrorTarget.from_batch(mb, "cpu", fused=True, impl="torch")
    loss, _ = model(build_inputs(mb, "cpu"), target=target)
    return loss


# ---------------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("engine", ["pilot", "copilot"])
def test_parameters_gradients_and_adamw_states_are_exact(engine):
    cfg = config("train.pilot.zero.stage=0", "train.copilot.zero.stage=0")
    en = plan(cfg, 1).engines[0 if engine == "pilot" else 1]
    model = real_pilot(cfg) if engine == "pilot" else real_copilot(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    (pilot_step if engine == "pilot" else copilot_step)(cfg, model).backward()
    opt.step()
    params = list(model.parameters())
    assert en.params == sum(p.numel() for p in params)
    assert line(en, "parameters") == sum(p.nbytes for p in params)
    assert line(en, "gradients") == sum(p.grad.nbytes for p in params)
    assert line(en, "AdamW") == sum(t.nbytes for s in opt.state.values() for t in s.values()
                                    if torch.is_tensor(t) and t.dim() > 0)


def test_lora_counts_match_peft():
    cfg = config("pilot.lora.enabled=true")
    en = plan(cfg, 1).engines[0]
    model = real_pilot(cfg)
    assert en.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert en.params == sum(p.numel() for p in model.parameters())
    assert en.model.endswith("+ LoRA r=32")


@pytest.mark.parametrize("overrides, tol", [
    ([], 0.25), (["model.dtype=bfloat16"], 0.25), (["pilot.lora.enabled=true"], 0.25),
    (["pilot.lora.enabled=true", "pilot.lora.dropout=0"], 0.25), (T5, 0.5),
    (["copilot.init_from=none", "copilot.num_kv_heads=2", "copilot.head_dim=48"], 0.25),
], ids=["fp32", "bf16", "lora", "lora-no-dropout", "t5", "copilot-gqa"])
def test_activations_match_saved_tensors(overrides, tol):
    cfg = config(*overrides)
    pilot_plan, copilot_plan = plan(cfg, 1).engines
    for est, model, step in ((pilot_plan.activations.full, real_pilot(cfg), pilot_step),
                             (copilot_plan.activations.full, real_copilot(cfg), copilot_step)):
        with SavedBytes(model) as saved:
            step(cfg, model)
        assert abs(est / saved.total - 1) <= tol, (type(model).__name__, est, saved.total)


def test_gradient_checkpointing_lowers_the_estimate_and_matches():
    off, on = plan(config(), 1), plan(config("pilot.gradient_checkpointing=true",
                                             "copilot.gradient_checkpointing=true"), 1)
    for a, b in zip(off.engines, on.engines, strict=True):
        assert b.activations.used == a.activations.checkpointed < a.activations.used
    assert on.device_total < off.device_total
    cfg = config("pilot.gradient_checkpointing=true")
    model = real_pilot(cfg, reentrant_checkpointing=True)
    with SavedBytes(model) as saved:
        pilot_step(cfg, model)
    acts = on.engines[0].activations  # kept at the end of the forward: all but the recompute
    est = acts.checkpointed - max(acts.layers)
    assert abs(est / saved.total - 1) <= 0.35, (est, saved.total)


# ------------------------------------------------------------------------------ ZeRO semantics
def _zero(stage: int, **zero: object) -> dict[str, tuple[int, int]]:
    cfg = config(f"train.pilot.zero.stage={stage}",
                 *(f"train.pilot.zero.{k}={v}" for k, v in zero.items()))
    lines = zero_lines(cfg.train.pilot, n=1000, trainable=1000, largest=100, largest_grad=100,
                       persist=0, world=4, e=2, mixed=True)
    return {x.name.split(" ")[0]: (x.device, x.host) for x in lines}


def test_zero_stages_shard_what_they_should():
    assert [_zero(s)["parameters"] for s in (0, 1, 2, 3)] == [(2000, 0)] * 3 + [(500, 0)]
    assert [_zero(s)["gradients"] for s in (0, 1, 2, 3)] == [(2000, 0)] * 2 + [(500, 0)] * 2
    assert [_zero(s)["AdamW:"] for s in (0, 1, 2, 3)] == [(12000, 0)] + [(3000, 0)] * 3
    assert _zero(3)["ZeRO"] == (50_000_000 * 2, 0)  # the reduce bucket, not sharded
    assert _zero(3, reduce_bucket_size=1000)["ZeRO"] == (2000, 0)
    off = _zero(3, offload_optimizer="cpu", offload_param="cpu")
    assert off["parameters"] == (0, 500) and off["AdamW:"] == (0, 3000)
    assert off["gradients"] == (0, 250 * 4)  # fp32 partitions on the host


def test_persistent_parameters_stay_whole_and_fp32_has_no_master_copy():
    cfg = config("train.pilot.zero.stage3_param_persistence_threshold=200")
    lines = zero_lines(cfg.train.pilot, n=1000, trainable=1000, largest=100, largest_grad=100,
                       persist=200, world=4, e=4, mixed=False)
    assert lines[0].device == (200 + 200) * 4  # 800 / 4 sharded + 200 whole
    assert lines[2].device == math.ceil(1000 / 4) * 8  # two fp32 moments


# ------------------------------------------------------------------------ plans of other shapes
def test_a_paper_sized_shape_is_planned_without_allocating():
    # LLaMA-3.2-3B's shape (the char vocabulary) with a 1B-shaped Copilot, bf16, LoRA, 8 ranks.
    cfg = load_config("configs/default.yaml", [
        "model.dtype=bfloat16", "base.enabled=false", "copilot.init_from=none",
        "model.arch.hidden_size=3072", "model.arch.intermediate_size=8192",
        "model.arch.num_layers=28", "model.arch.num_heads=24", "model.arch.num_kv_heads=8",
        "copilot.hidden_size=2048", "copilot.intermediate_size=8192", "copilot.num_layers=16",
        "copilot.num_heads=32", "data.max_length=512", "train.pilot.micro_batch_size=4",
        "pilot.lora.enabled=true", "pilot.gradient_checkpointing=true"])
    p = plan(cfg, 8)
    pilot = p.engines[0]
    d, i, kv, L, V, r = 3072, 8192, 1024, 28, 100, 32
    layer = 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d
    adapters = L * r * (2 * (d + d) + 2 * (d + kv) + 2 * (d + i) + (i + d))
    assert pilot.trainable == adapters
    assert pilot.params == 2 * V * d + L * layer + d + adapters
    assert line(pilot, "AdamW") == math.ceil(adapters / 8) * 12
    assert line(pilot, "parameters") == math.ceil(pilot.params / 8) * 2
    assert pilot.activations.used == pilot.activations.checkpointed
    text = format_plan(p, 8.0)
    assert "WARNING: the plan's" in text and "exceeds the device's 8 GiB" in text
    assert "copilot.gradient_checkpointing=true" in text
    assert not any(h.startswith("pilot.gradient_checkpointing") for h in p.hints)  # it is on
    assert "WARNING" not in format_plan(p, 141.0)


def test_a_pretrained_pilot_is_planned_from_its_config_json_alone(tmp_path):
    # Qwen2.5-7B's config.json (no weights) in a local folder, with the paper config around it.
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                tie_word_embeddings=False).save_pretrained(tmp_path)
    cfg = load_config("configs/qwen2.5-7b+0.5b.yaml", [f"model.name_or_path={tmp_path}"])
    p = plan(cfg, 64)
    pilot, copilot = p.engines
    assert pilot.model == "Qwen2ForCausalLM + LoRA r=32"
    assert pilot.params - pilot.trainable == 7_615_616_512  # Qwen2.5-7B's published count
    assert line(pilot, "AdamW") == math.ceil(pilot.trainable / 64) * 12  # offload_optimizer
    assert [x.host > 0 for x in pilot.lines[:3]] == [False, True, True]
    assert copilot.params > 0 and pilot.activations.checkpointing
    assert "WARNING" not in format_plan(p, 80.0)


def test_host_lines_memory_backend_and_offload():
    cfg = config("mistake_log.backend=memory", "train.copilot.zero.offload_optimizer=cpu")
    p = plan(cfg, 2)
    (window, _) = p.host
    T, d, k = 96, 128, 16
    assert window.host == 128 * 8 * (T * (4 * d + 12 * k + 12) + 44)
    assert line(p.engines[1], "AdamW") == p.engines[1].lines[2].host > 0
    assert p.host_total >= window.host + p.engines[1].lines[2].host


# ------------------------------------------------------------------------------------ dry-run
def test_dry_run_prints_config_deepspeed_and_plan(capsys):
    assert train_main(["--config", "configs/default.yaml", "--dry-run", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and '"stage": 3' in out
    assert "# DeepSpeed configs (world_size=2)" in out
    assert "# memory plan per rank (world_size=2" in out
    assert "activations, gradient checkpointing off *  <- config" in out
    assert "parameters (fp32, ZeRO-3 shard 1/2)" in out and "total per rank: device" in out


def test_dry_run_warns_when_the_device_is_too_small(capsys):
    assert train_main(["--config", "configs/default.yaml", "--dry-run",
                       "--device-memory-gib", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the plan's" in out and "exceeds the device's 0.5 GiB; try" in out
    assert "pilot.gradient_checkpointing=true" in out and "more ranks" in out


def test_offline_unknown_pretrained_pilot_prints_a_note_and_exits_0(capsys):
    name = "some-org/a-model-nobody-has"
    assert plan(load_config(None, [f"model.name_or_path={name}", "base.enabled=false",
                                   "copilot.init_from=none"]), 8).note is not None
    assert train_main(["--config", "configs/default.yaml", "--dry-run",
                       f"model.name_or_path={name}", "base.enabled=false",
                       "copilot.init_from=none"]) == 0
    cap = capsys.readouterr()
    (note,) = [x for x in cap.out.splitlines() if x.startswith("no memory plan")]
    assert name in note and "huggingface-cli download" in note
    assert "Traceback" not in cap.err


def test_paper_configs_plan_offline_from_the_recorded_architecture(capsys):
    p = plan(load_config("configs/llama3.2-3b+1b.yaml"), 8)
    assert p.note is None
    pilot = p.engines[0]
    # Llama-3.2-3B's published size, tied embeddings counted once, plus the r=32 adapters on
    # all seven projections of its 28 layers.
    assert pilot.params - pilot.trainable == 3_212_749_824
    assert pilot.trainable == 28 * 32 * (2 * (3072 + 3072) + 2 * (3072 + 1024)
                                         + 3 * (3072 + 8192))
    assert train_main(["--config", "configs/llama3.2-3b+1b.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "architecture from its published config.json" in out
    assert "train.epochs=3: the step count" in out


def test_world_size_must_be_positive():
    with pytest.raises(SystemExit):
        parse_args(["--dry-run", "--world-size", "0"])
    assert parse_args(["--world-size", "64"]).world_size == 64


def test_an_empty_plan_formats():
    assert "device memory" not in format_plan(MemoryPlan(1, note="no memory plan: x"), 1.0)
    assert GiB == 2**30
