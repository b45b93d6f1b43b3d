"""Per-rank memory plan of a run from its config alone (`--dry-run`), before any weight loads.

`plan(cfg, world_size)` builds both models without storage (meta device, or fake tensors where a
constructor needs data): parameter counts and shapes are exact. It adds up every long-lived buffer
(ARCHITECTURE.md item 10); `format_plan` prints it; docs/memory_plan.md explains each line. Bytes
per rank; n parameters (n_t trainable), W ranks, e bytes of model.dtype, s of storage_dtype, B a
micro batch, T = data.max_length (every sequence full: an upper bound), N = B*T, d width, I MLP
width, a = heads*head_dim, V vocabulary, k = mistake_log.topk.

* ZeRO: parameters n*e, gradients n_t*e, AdamW n_t*8 (two fp32 moments) + n_t*4 fp32 master
  weights under bf16/fp16 (fp32 training steps the parameters in place). Stage 1 shards the
  optimizer over W, 2 also the gradients, 3 also the parameters (but those of <=
  stage3_param_persistence_threshold elements). offload_optimizer=cpu puts optimizer and fp32
  gradient partitions in host memory, offload_param=cpu the parameters. ZeRO-3 gathers the
  running module whole: the largest one, plus the prefetch bucket (DeepSpeed default 5e7
  elements), plus the largest trainable module's full gradient before its reduce-scatter.
  Stages 1-3 allocate a reduce bucket of `zero.reduce_bucket_size` elements (tcp: 5e7;
  DeepSpeed's own default is 5e8; x2 at stage 1/2 with overlap_comm), whatever the model's size
  (on CPU, untouched pages stay virtual).
* Activations kept for the backward by a pre-norm block over N rows (Korthikanti et al.'s
  (34d + 5*heads*T)*N bytes in 16-bit, re-derived for LLaMA: SwiGLU, no dropout, fused SDPA):
      N * ((attns + 1)*(4 + 2e)*d + attns*4*a*e + 4*I*e)
  each RMSNorm its fp32 input, normalised and scaled outputs; each attention q, k, v and output
  (k, v at full width: with a padding mask HF repeats grouped KV heads; fused SDPA keeps no (T, T)
  scores); the MLP gate, up, silu(gate), product. Plus token ids, final norm, HF's (B, 1, T, T)
  mask, rotary tables; the Copilot N*T*e per attention (SDPA's float copy of its boolean mask). T5
  is coarser: gated-GELU with dropout (7*I*e), eager attention keeping (T, T) scores, probabilities
  and dropout (B*heads*T^2*(3e + 1)), the costlier of encoder and decoder at T rows. Checkpointing
  keeps N*d*e per layer (its input) plus one whole layer while it is recomputed. LoRA adds
  N*(r*e + in*(e + 1)) per adapted Linear (dropout's input copy and mask, A's output).
* Loss head: fused - one (rows, V) chunk in e (rows: kernels.chunk_mib MiB of fp32; the Copilot's
  holds whole sequences) and fp32 gradients of its input (N, d) and weight (V, d), made in the
  forward; eager - (N, V) logits in e and two fp32 (N, V).
* Copilot batch: the Pilot's micro batch (include_current) + replay_size entries, as the trainer
  feeds it (train.copilot.micro_batch_size is DeepSpeed's bookkeeping), queries and memory at T
  rows; its sparse error input is an embedding bag: (E, T, k+1) ids and values, (E, T, d_C) out.
* Mistake Log (host): an entry of T rows is T*(s*d_P + 12k + 12) + 44 bytes in memory (int64 ids,
  fp32 probabilities). The writer holds <= 2*queue_depth + commit_every_steps steps (queued,
  appended but not committed, being staged) and, committing, ~3 copies of those steps plus two
  open write units per array; the sampler the uncommitted steps in stored form, read_cache_mib
  and prefetch + 1 replay batches; the memory backend a window.
* The engines' steps never overlap: device total = both engines' resident state + the larger
  step's working set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tcp.config import EngineConfig, RunConfig

GiB, MiB = 2**30, 2**20
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DS_PREFETCH_BUCKET = 50_000_000
"""DeepSpeed's default stage3_prefetch_bucket_size (elements)."""


@dataclass
class Line:
    """One line item: bytes per rank on the device and in host memory."""

    name: str
    device: int = 0
    host: int = 0
    transient: bool = False
    """Live only during its engine's step (forward, backward, optimizer step)."""


@dataclass
class Activations:
    """What one engine's forward keeps for its backward, for one micro batch."""

    layers: list[int]
    """Bytes each layer keeps without checkpointing."""
    kept: list[int]
    """Bytes each layer keeps under gradient checkpointing (its input)."""
    other: int
    """Outside the layers: inputs, ids, masks, rotary tables, final norm."""
    checkpointing: bool
    """Whether the config turns gradient checkpointing on."""

    @property
    def full(self) -> int:
        """Without gradient checkpointing."""
        return sum(self.layers) + self.other

    @property
    def checkpointed(self) -> int:
        """With it: every layer's input, plus the largest layer during its recompute."""
        return sum(self.kept) + max(self.layers, default=0) + self.other

    @property
    def used(self) -> int:
        """The config's figure."""
        return self.checkpointed if self.checkpointing else self.full


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


def abstract_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` without storage: on the meta device, or as fake tensors when the constructor
    needs data (e.g. copies a tensor to the CPU). Exact shapes; nothing is allocated."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            return build()


def pilot_model(cfg: RunConfig) -> nn.Module:
    """The Pilot without storage, from `model.arch` (vocabulary: the run's tokenizer) or from
    the pretrained model's config.json (a local folder or the HF cache; OSError if neither)."""
    m = cfg.model
    if m.name_or_path is None:
        from transformers import AutoTokenizer

        from tcp.data.tokenizer import build_char_tokenizer
        from tcp.models.pilot import build_model

        vocab = len(build_char_tokenizer() if cfg.data.tokenizer is None else
                    AutoTokenizer.from_pretrained(cfg.data.tokenizer,
                                                  trust_remote_code=m.trust_remote_code))
        return abstract_model(lambda: build_model(m.arch, vocab_size=vocab, pad_id=0, bos_id=None,
                                                  eos_id=None, seed=0))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        conf = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except OSError:
        from tcp.models.twins import PAPER_MODELS, paper_config

        if m.name_or_path not in PAPER_MODELS:
            raise
        conf = paper_config(m.name_or_path)  # offline: tcp's record of the published config
    auto = AutoModelForSeq2SeqLM if conf.is_encoder_decoder else AutoModelForCausalLM
    return abstract_model(lambda: auto.from_config(conf, trust_remote_code=m.trust_remote_code))


def lora_targets(model: nn.Module, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of every Linear whose last name component is a LoRA target (as peft matches)."""
    return [(mod.in_features, mod.out_features) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def block_bytes(rows: int, *, d: int, a: int, inner: int, e: int, attns: int = 1,
                mlp: int = 4) -> int:
    """Bytes a pre-norm block keeps for its backward over `rows` token rows (module docstring)."""
    return rows * ((attns + 1) * (4 + 2 * e) * d + attns * 4 * a * e + mlp * inner * e)


def pilot_activations(cfg: RunConfig, model: nn.Module) -> Activations:
    """The Pilot's activations for one micro batch of T = data.max_length tokens."""
    from tcp.models.pilot import decoder_layers, is_encoder_decoder

    c: Any = model.config  # an HF PretrainedConfig
    e = _BYTES[cfg.model.dtype]
    B, T = cfg.train.pilot.micro_batch_size, cfg.data.max_length
    N, d, heads = B * T, c.hidden_size, c.num_attention_heads
    a = heads * (getattr(c, "head_dim", None) or getattr(c, "d_kv", None) or d // heads)
    inner = (getattr(c, "intermediate_size", None) or getattr(c, "d_ff", None)
             or getattr(c, "n_inner", None) or 4 * d)
    # The final norm keeps its output for an eager head only (the fused loss saves no input).
    norm = (4 + e) * d if cfg.kernels.fused else (4 + 2 * e) * d
    lora, extra = cfg.pilot.lora, 0
    if lora.enabled:  # the adapted Linears of one decoder layer
        extra = sum(N * (lora.r * e + (i * (e + 1) if lora.dropout > 0 else 0))
                    for i, _ in lora_targets(decoder_layers(model)[0], lora.target_modules))
    if is_encoder_decoder(model):
        scores = B * heads * T * T * (3 * e + 1)
        enc = block_bytes(N, d=d, a=a, inner=inner, e=e, mlp=7) + scores + extra
        dec = block_bytes(N, d=d, a=a, inner=inner, e=e, attns=2, mlp=7) + 2 * scores + extra
        # Prompt (encoder) and answer (decoder) rows share T: the costlier stack at T rows.
        layers = max([enc] * c.num_layers, [dec] * c.num_decoder_layers, key=sum)
        other = 2 * N * (8 + norm)
    else:
        layers = [block_bytes(N, d=d, a=a, inner=inner, e=e) + extra] * c.num_hidden_layers
        other = N * (8 + norm) + B * T * T * e + 2 * N * (a // heads) * e
    return Activations(layers=layers, kept=[N * d * e] * len(layers), other=other,
                       checkpointing=cfg.pilot.gradient_checkpointing)


def copilot_batch_size(cfg: RunConfig) -> int:
    """Entries per Copilot step: the current step's (include_current) plus the replayed ones."""
    ml = cfg.mistake_log
    return (cfg.train.pilot.micro_batch_size if ml.include_current else 0) + ml.replay_size


def copilot_activations(cfg: RunConfig, model: nn.Module, d_pilot: int) -> Activations:
    """The Copilot's activations, queries and memory at T rows per entry."""
    cc, e, s = cfg.copilot, _BYTES[cfg.model.dtype], _BYTES[cfg.mistake_log.storage_dtype]
    E, T, k = copilot_batch_size(cfg), cfg.data.max_length, cfg.mistake_log.topk
    N, d, hd = E * T, cc.hidden_size, cc.head_dim or cc.hidden_size // cc.num_heads
    blocks: Any = model.layers  # grouped k/v are widened to num_heads * hd before SDPA
    atts = [2 if blk.kind == "both" else 1 for blk in blocks]
    layers = [block_bytes(N, d=d, a=cc.num_heads * hd, inner=cc.intermediate_size, e=e, attns=n)
              + n * N * T * e for n in atts]
    other = (N * (s * d_pilot + 12 * (k + 1) + 26)  # padded inputs: [X~; h], sparse errors, ids
             + (N * d_pilot * e if s != e else 0)  # the memory cast to the working dtype
             + N * d * (8 + 3 * e if cfg.kernels.fused else 8 + 4 * e)  # memory, final norms
             + 2 * E * T * T + 4 * N * hd * e)  # boolean masks, rotary tables
    return Activations(layers=layers, kept=[N * d * e] * len(layers), other=other,
                       checkpointing=cc.gradient_checkpointing)


def head_line(cfg: RunConfig, *, rows: int, d: int, vocab: int, bias: bool, min_rows: int = 0,
              weight_grad: bool = True) -> Line:
    """The loss head's working set over `rows` target rows (fused chunk, or eager logits);
    `weight_grad`: whether the head's weight trains (not under LoRA)."""
    from tcp.kernels.chunking import rows_per_chunk

    e = _BYTES[cfg.model.dtype]
    if cfg.kernels.fused:
        chunk = min(rows, max(min_rows, rows_per_chunk(vocab, cfg.kernels.chunk_mib)))
        b = chunk * vocab * e + 4 * rows * d + (4 * vocab * (d + bias) if weight_grad else 0)
        return Line(f"loss head, fused: {chunk} x {vocab} chunk + fp32 grads of input"
                    + (", W" if weight_grad else ""), device=b, transient=True)
    return Line(f"loss head, eager: {rows} x {vocab} logits + 2 fp32 copies",
                device=rows * vocab * (e + 8), transient=True)


def zero_lines(eng: EngineConfig, *, n: int, trainable: int, largest: int, largest_grad: int,
               persist: int, world: int, e: int, mixed: bool) -> list[Line]:
    """Parameters, gradients, optimizer states and ZeRO buffers of one engine on one rank.
    `largest`: the largest module's own parameters, `largest_grad`: the largest module's own
    trainable ones; `persist`: the parameters ZeRO-3 keeps whole."""
    z, st = eng.zero, eng.zero.stage

    def shard(x: int, on: bool) -> int:
        return math.ceil(x / world) if on else x

    tag, dt = f"ZeRO-{st} shard 1/{world}", {4: "fp32", 2: "16-bit"}[e]
    p, off_p = shard(n - persist, True) + persist if st == 3 else n, z.offload_param == "cpu"
    where = "host, offload_param" if off_p else tag if st == 3 else "whole"
    lines = [Line(f"parameters ({dt}, {where})", device=0 if off_p else p * e,
                  host=p * e if off_p else 0)]
    g, o = shard(trainable, st >= 2), shard(trainable, st >= 1)
    what = "fp32 master + 2 moments" if mixed else "2 fp32 moments"
    if z.offload_optimizer == "cpu":
        lines += [Line(f"gradients (fp32 on host, {tag if st >= 2 else 'whole'})", host=g * 4),
                  Line(f"AdamW: {what} (host, offload_optimizer)", host=o * (12 if mixed else 8))]
    else:
        lines += [Line(f"gradients ({dt}, {tag if st >= 2 else 'whole'})", device=g * e),
                  Line(f"AdamW: {what} ({tag if st else 'whole'})",
                       device=o * (12 if mixed else 8))]
    if st == 3:
        pre = min(DS_PREFETCH_BUCKET, n - largest)
        lines.append(Line(f"ZeRO-3 gathered: largest module {_count(largest)} + prefetch "
                          f"{_count(pre)} + a full grad of {_count(largest_grad)}",
                          device=(largest + pre + largest_grad) * e, transient=True))
    if st >= 1:
        k = 2 if z.overlap_comm and st < 3 else 1
        lines.append(Line(f"ZeRO reduce bucket: {k} x {_count(z.reduce_bucket_size)} "
                          "(zero.reduce_bucket_size)", device=k * z.reduce_bucket_size * e))
    else:
        lines.append(Line("gradient all-reduce buffer", transient=True,
                          device=min(z.reduce_bucket_size, trainable) * e))
    return lines


def mistake_log_lines(cfg: RunConfig, d_pilot: int, vocab: int) -> list[Line]:
    """Host buffers of the Mistake Log writer and sampler (or of the memory backend)."""
    ml, st, B, T = cfg.mistake_log, cfg.mistake_log.store, cfg.train.pilot.micro_batch_size, \
        cfg.data.max_length
    s = _BYTES[ml.storage_dtype]  # an entry of T rows (X~ and h together), in memory / on disk
    mem, disk = T * (s * d_pilot + 12 * ml.topk + 12) + 44, T * (s * d_pilot + 8 * ml.topk + 8) + 56
    if ml.backend == "memory":
        assert ml.window_steps != "all"  # rejected by the config
        return [Line(f"window: {ml.window_steps} steps x {B} entries",
                     host=ml.window_steps * B * mem),
                Line(f"replay batch: {ml.replay_size} entries", host=ml.replay_size * mem)]
    import numpy as np

    from tcp.mistake_log.format import ALL_ARRAYS, Schema, write_unit

    schema = Schema(d_pilot, min(ml.topk, vocab), ml.storage_dtype)
    units = sum(write_unit(schema, a, st) * math.prod(schema.row_shape(a))
                * np.dtype(schema.dtype(a)).itemsize for a in ALL_ARRAYS)
    q, c = st.queue_depth, st.commit_every_steps
    return [Line(f"writer: staged steps, {2 * q + c} (2 x queue_depth + commit_every_steps) x "
                 f"{B} entries", host=(2 * q + c) * B * mem),
            Line(f"writer: commit copies, 3 x {q + c} steps + 2 open write units per array",
                 host=3 * (q + c) * B * disk + 2 * units),
            Line(f"sampler: uncommitted steps in stored form, {q + c} x {B} entries",
                 host=(q + c) * B * disk),
            Line("sampler: decoded-chunk cache (read_cache_mib)",
                 host=int(st.read_cache_mib * MiB)),
            Line(f"sampler: replay batches, ({st.prefetch} prefetched + 1) x {ml.replay_size} "
                 "entries", host=(st.prefetch + 1) * ml.replay_size * mem)]


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
    from tcp.models.copilot import Copilot
    from tcp.models.pilot import is_encoder_decoder
    from tcp.models.twins import PAPER_MODELS

    if cfg.data.max_length == "auto":  # sized from the data when the run starts
        from tcp.data.prepare import planned_max_length

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
    e, mixed, T = _BYTES[cfg.model.dtype], cfg.model.dtype != "float32", cfg.data.max_length
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
                _BYTES[cfg.mistake_log.storage_dtype]
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


def _count(n: int) -> str:
    return next((f"{n / v:.3g}{u}" for u, v in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if n >= v),
                str(n))


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
        out.append(f"{en.name}: {en.model}, {_count(en.params)} parameters "
                   f"({_count(en.trainable)} trainable), micro batch {en.batch}")
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
