"""The terms of the per-rank memory plan (memory_plan.py): the models built without storage, and
the bytes of each long-lived buffer. Bytes per rank; n parameters (n_t trainable), W ranks, e
bytes of model.dtype, s of storage_dtype, B a micro batch, T = data.max_length (every sequence
full: an upper bound), N = B*T, d width, I MLP width, a = heads*head_dim, V vocabulary,
k = mistake_log.topk.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tcp.config import EngineConfig, RunConfig
from tcp.data.tokenizer import build_char_tokenizer
from tcp.kernels.chunking import rows_per_chunk
from tcp.mistake_log.format import ALL_ARRAYS, Schema, write_unit
from tcp.models.pilot import build_model, decoder_layers, is_encoder_decoder
from tcp.models.twins import PAPER_MODELS, paper_config

GiB, MiB = 2**30, 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
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


def abstract_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` without storage: on the meta device, or as fake tensors when the constructor
    needs data (e.g. copies a tensor to the CPU). Exact shapes; nothing is allocated."""
    try:
        with torch.device("meta"):
            return build()
    except (NotImplementedError, RuntimeError):
        from torch._subclasses.fake_tensor import FakeTensorMode  # heavy: not for --help

        with FakeTensorMode(allow_non_fake_inputs=True):
            return build()


def pilot_model(cfg: RunConfig) -> nn.Module:
    """The Pilot without storage, from `model.arch` (vocabulary: the run's tokenizer) or from
    the pretrained model's config.json (a local folder or the HF cache; OSError if neither)."""
    m = cfg.model
    if m.name_or_path is None:
        # heavy: transformers loads only where a model is built
        from transformers import AutoTokenizer

        vocab = len(build_char_tokenizer() if cfg.data.tokenizer is None else
                    AutoTokenizer.from_pretrained(cfg.data.tokenizer,
                                                  trust_remote_code=m.trust_remote_code))
        return abstract_model(lambda: build_model(m.arch, vocab_size=vocab, pad_id=0, bos_id=None,
                                                  eos_id=None, seed=0))
    # heavy: transformers loads only where a model is built
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        conf = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    except OSError:
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
    c: Any = model.config  # an HF PretrainedConfig
    e = DTYPE_BYTES[cfg.model.dtype]
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
    cc, e, s = cfg.copilot, DTYPE_BYTES[cfg.model.dtype], DTYPE_BYTES[cfg.mistake_log.storage_dtype]
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

    e = DTYPE_BYTES[cfg.model.dtype]
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
        lines.append(Line(f"ZeRO-3 gathered: largest module {count_text(largest)} + prefetch "
                          f"{count_text(pre)} + a full grad of {count_text(largest_grad)}",
                          device=(largest + pre + largest_grad) * e, transient=True))
    if st >= 1:
        k = 2 if z.overlap_comm and st < 3 else 1
        lines.append(Line(f"ZeRO reduce bucket: {k} x {count_text(z.reduce_bucket_size)} "
                          "(zero.reduce_bucket_size)", device=k * z.reduce_bucket_size * e))
    else:
        lines.append(Line("gradient all-reduce buffer", transient=True,
                          device=min(z.reduce_bucket_size, trainable) * e))
    return lines


def mistake_log_lines(cfg: RunConfig, d_pilot: int, vocab: int) -> list[Line]:
    """Host buffers of the Mistake Log writer and sampler (or of the memory backend)."""
    ml, st, B, T = cfg.mistake_log, cfg.mistake_log.store, cfg.train.pilot.micro_batch_size, \
        cfg.data.max_length
    s = DTYPE_BYTES[ml.storage_dtype]  # an entry of T rows (X~ and h together), in memory / on disk
    mem, disk = T * (s * d_pilot + 12 * ml.topk + 12) + 44, T * (s * d_pilot + 8 * ml.topk + 8) + 56
    if ml.backend == "memory":
        assert ml.window_steps != "all"  # rejected by the config
        return [Line(f"window: {ml.window_steps} steps x {B} entries",
                     host=ml.window_steps * B * mem),
                Line(f"replay batch: {ml.replay_size} entries", host=ml.replay_size * mem)]

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


def count_text(n: int) -> str:
    """`n` as people read it: 1.2M, 340K."""
    return next((f"{n / v:.3g}{u}" for u, v in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if n >= v),
                str(n))
