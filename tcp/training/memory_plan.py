"""Per-rank memory plan of a run from its config alone (`--dry-run`), before any weight loads.

`plan(cfg, world_size)` builds both models without storage (meta device, or fake tensors where a
constructor needs data): parameter counts and shapes are exact. It adds up every long-lived buffer
(one line per buffer, each term in memory_terms.py); `format_plan` prints it;
docs/memory_plan.md explains each line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcp.config import RunConfig
from tcp.data.prepare import planned_max_length
from tcp.models.copilot import Copilot
from tcp.models.pilot import is_encoder_decoder
from tcp.models.twins import PAPER_MODELS
from tcp.training.memory_terms import (
    DTYPE_BYTES,
    Activations,
    GiB,
    Line,
    MiB,
    abstract_model,
    copilot_activations,
    copilot_batch_size,
    count_text,
    head_line,
    lora_targets,
    mistake_log_lines,
    pilot_activations,
    pilot_model,
    zero_lines,
)


@dataclass
class EnginePlan:
    """One engine (Pilot or Copilot) on one rank."""
    name: str
    model: str
    params: int
    trainable: int
    batch: str
    lines: list[Line]
    activations: Activations

    @property
    def resident(self) -> int:
        """Device bytes held for the whole run."""
        return sum(x.device for x in self.lines if not x.transient)

    @property
    def working(self) -> int:
        """Device bytes live only during this engine's step."""
        return sum(x.device for x in self.lines if x.transient) + self.activations.used


@dataclass
class MemoryPlan:
    """The per-rank plan of a run."""
    world_size: int
    engines: list[EnginePlan] = field(default_factory=list)
    host: list[Line] = field(default_factory=list)
    """Mistake Log buffers (host memory)."""
    hints: list[str] = field(default_factory=list)
    """Config changes that shrink the device total (for the warning)."""
    note: str | None = None
    """Why there is no plan (the Pilot's config.json is not available, ...)."""
    remarks: list[str] = field(default_factory=list)
    """Printed under the head: where a config came from, what is not resolved yet."""
    @property
    def device_total(self) -> int:
        """Both engines' resident bytes plus the larger step's working set."""
        return (sum(e.resident for e in self.engines)
                + max((e.working for e in self.engines), default=0))

    @property
    def host_total(self) -> int:
        """Host bytes of both engines (offload) and of the Mistake Log."""
        return sum(x.host for e in self.engines for x in e.lines) + sum(x.host for x in self.host)


def plan(cfg: RunConfig, world_size: int) -> MemoryPlan:
    """The per-rank memory plan of `cfg` on `world_size` ranks. Loads no weights; a pretrained
    Pilot's config.json must be local (folder or HF cache) or reachable, else `note` says so."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    out = MemoryPlan(world_size=world_size)
    try:
        pilot = pilot_model(cfg)
    except (OSError, ValueError) as err:  # not found / offline, or an unknown model type
        name = cfg.model.name_or_path or cfg.data.tokenizer
        why = (str(err).splitlines() or [""])[0][:160]
        out.note = (f"no memory plan: it needs the config.json of {name!r} from a local folder, "
                    f"the HF cache or the hub ({type(err).__name__}: {why}); fetch it once with "
                    f"`huggingface-cli download {name} config.json` or point "
                    "model.name_or_path at a local folder")
        return out

    if cfg.data.max_length == "auto":  # sized from the data when the run starts
        cfg, remark = planned_max_length(cfg, pilot.config)
        out.remarks.append(remark)
    name = cfg.model.name_or_path
    if name in PAPER_MODELS and not Path(name).is_dir():
        out.remarks.append(f"{name}: architecture from its published config.json (tcp's record, "
                           "tcp/models/twins.py) when the hub copy is not available")
    if cfg.train.epochs is not None:
        out.remarks.append(f"train.epochs={cfg.train.epochs:g}: the step count (and the "
                           "schedules above) is derived from the training set when the run "
                           "starts; train.steps is a placeholder here")
    e, mixed, T = DTYPE_BYTES[cfg.model.dtype], cfg.model.dtype != "float32", cfg.data.max_length
    conf: Any = pilot.config
    vocab, d_p = int(conf.vocab_size), int(conf.hidden_size)
    arch = cfg.copilot.architecture  # as tcp.training.joint_job builds it
    encdec = arch == "encoder_decoder" or (arch == "auto" and is_encoder_decoder(pilot))
    cop = abstract_model(lambda: Copilot(cfg.copilot, vocab_size=vocab, pilot_hidden=d_p,
                                         encoder_decoder=encdec))
    for name, model, eng, acts in (
            ("pilot", pilot, cfg.train.pilot, pilot_activations(cfg, pilot)),
            ("copilot", cop, cfg.train.copilot, copilot_activations(cfg, cop, d_p))):
        params = list(model.parameters())  # tied parameters once
        n = trainable = sum(p.numel() for p in params)
        largest = largest_grad = max(sum(p.numel() for p in m.parameters(recurse=False))
                                     for m in model.modules())
        thr = eng.zero.stage3_param_persistence_threshold if eng.zero.stage == 3 else 0
        persist = sum(p.numel() for p in params if p.numel() <= thr)
        label = type(model).__name__
        if name == "pilot" and cfg.pilot.lora.enabled:
            lora = cfg.pilot.lora
            shapes = lora_targets(model, lora.target_modules)
            trainable = sum(lora.r * (i + o) for i, o in shapes)
            largest_grad = max((lora.r * max(i, o) for i, o in shapes), default=0)  # A or B
            n, label = n + trainable, f"{label} + LoRA r={lora.r}"
        lines = zero_lines(eng, n=n, trainable=trainable, largest=largest, persist=persist,
                           largest_grad=largest_grad, world=world_size, e=e, mixed=mixed)
        if name == "pilot":
            B, k, s = cfg.train.pilot.micro_batch_size, cfg.mistake_log.topk, \
                DTYPE_BYTES[cfg.mistake_log.storage_dtype]
            head = pilot.get_output_embeddings()  # type: ignore[operator]
            lines += [head_line(cfg, rows=B * T, d=d_p, vocab=vocab,
                                bias=getattr(head, "bias", None) is not None,
                                weight_grad=not cfg.pilot.lora.enabled),
                      Line("Mistake Log capture: X~, pooled h (+ fp32 sum), top-k",
                           device=B * T * ((s + 4) * d_p + 12 * k + 12))]
            batch = f"{B} x {T} tokens"
        else:
            E, d_c = copilot_batch_size(cfg), cfg.copilot.hidden_size
            lines += [head_line(cfg, rows=E * T, d=d_c, vocab=vocab, bias=True, min_rows=T),
                      Line("error input: ids/values (E, T, k+1) + bag sums (E, T, d_C)",
                           transient=True,
                           device=E * T * ((cfg.mistake_log.topk + 1) * 12 + d_c * e))]
            batch = f"{E} entries x {T} tokens"
        out.engines.append(EnginePlan(name, label, n, trainable, batch, lines, acts))
    out.host = mistake_log_lines(cfg, d_p, vocab)
    out.hints = _hints(cfg, out)
    return out


def _hints(cfg: RunConfig, p: MemoryPlan) -> list[str]:
    h = [f"{en.name}.gradient_checkpointing=true (activations {_fmt(en.activations.full)} -> "
         f"{_fmt(en.activations.checkpointed)})" for en in p.engines
         if not en.activations.checkpointing]
    if not cfg.pilot.lora.enabled:
        h.append("pilot.lora.enabled=true (gradients and AdamW states for the adapters only)")
    h += [f"train.{n}.zero.offload_optimizer=cpu" for n in ("pilot", "copilot")
          if getattr(cfg.train, n).zero.offload_optimizer == "none"]
    if not cfg.kernels.fused:
        h.append("kernels.fused=true (no (tokens, V) logits)")
    return [*h, "a smaller micro batch or data.max_length",
            "more ranks (ZeRO-3 shards parameters, gradients and optimizer states over them)"]


def _fmt(b: int) -> str:
    return next((f"{b / v:.2f} {u}" for u, v in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024))
                 if b >= v), f"{b} B" if b else "-")


def format_plan(p: MemoryPlan, device_gib: float | None) -> str:
    """The plan as `--dry-run` prints it; `device_gib`: the device's memory (None: unknown)."""
    head = f"# memory plan per rank (world_size={p.world_size}; estimates: docs/memory_plan.md)"
    if p.note is not None:
        return f"{head}\n{p.note}\n"
    def row(name: str, device: str, host: str) -> str:
        return f"  {name:<76}{device:>12}{host:>12}".rstrip()

    out = [head, *(f"# {r}" for r in p.remarks),
           row("(* = live only during that engine's step)", "device", "host")]
    for en in p.engines:
        out.append(f"{en.name}: {en.model}, {count_text(en.params)} parameters "
                   f"({count_text(en.trainable)} trainable), micro batch {en.batch}")
        out += [row(x.name + (" *" if x.transient else ""), _fmt(x.device), _fmt(x.host))
                for x in en.lines]
        a = en.activations
        out += [row(f"activations, gradient checkpointing {'on' if on else 'off'} *"
                    + ("  <- config" if on == a.checkpointing else ""), _fmt(b), "")
                for on, b in ((False, a.full), (True, a.checkpointed))]
    out.append("mistake log:")
    out += [row(x.name, _fmt(x.device), _fmt(x.host)) for x in p.host]
    big = max(p.engines, key=lambda en: en.working)
    out.append(f"total per rank: device {_fmt(p.device_total)} (resident "
               f"{_fmt(sum(en.resident for en in p.engines))} + the {big.name} step's "
               f"{_fmt(big.working)}), host {_fmt(p.host_total)}")
    if device_gib is None:
        out.append("device memory: unknown (no local CUDA device; pass --device-memory-gib)")
    elif p.device_total > device_gib * GiB:
        out.append(f"WARNING: the plan's {_fmt(p.device_total)} per rank exceeds the device's "
                   f"{device_gib:g} GiB; try " + "; ".join(p.hints))
    else:
        pct = 100 * p.device_total / (device_gib * GiB)
        out.append(f"device memory: {device_gib:g} GiB, {pct:.0f}% of it planned")
    return "\n".join(out) + "\n"
