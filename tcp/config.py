"""Run configuration: nested dataclasses, YAML loading, dotted overrides, DeepSpeed rendering.

Every value is validated here, before any model or data is touched, so a typo in a YAML file or
on the command line fails in a second with a message naming the key and the fix, not after a
model has been loaded onto 64 GPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    # Messages are "key: problem; fix". The loader prefixes the section path.
    if not cond:
        raise ValueError(f"{key}: {msg}")


def _check_block_shape(cfg: Any) -> None:
    """Positive sizes, and a width that splits evenly into heads (Pilot arch and Copilot)."""
    for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
        _check(getattr(cfg, k) > 0, k, f"must be > 0 (got {getattr(cfg, k)})")
    _check(
        cfg.hidden_size % cfg.num_heads == 0,
        "hidden_size",
        f"must be divisible by num_heads ({cfg.hidden_size} % {cfg.num_heads} != 0)",
    )


@dataclass
class ArchConfig:
    """Shape of a model built from config (used when no pretrained path is given)."""

    family: Literal["llama", "t5"] = "llama"
    """'llama': a decoder-only LLaMA; 't5': an encoder-decoder T5 (num_layers encoder and
    num_layers decoder blocks, gated-GELU MLP of intermediate_size)."""
    hidden_size: int = 128
    """Model width d."""
    intermediate_size: int = 344
    """SwiGLU MLP width."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads (hidden_size must be divisible by it)."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads."""
    max_position_embeddings: int = 256
    """Longest sequence the rotary embedding is set up for."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""

    def __post_init__(self) -> None:
        _check_block_shape(self)
        kv = self.num_kv_heads or self.num_heads
        _check(self.num_heads % kv == 0, "num_kv_heads", "must divide num_heads")


@dataclass
class ModelConfig:
    """The Pilot: any Hugging Face causal LM, by name/path, or a tiny LLaMA built from `arch`."""

    name_or_path: str | None = None
    """HF hub name or local directory. None builds a LLaMA from `arch` (the embedded default)."""
    arch: ArchConfig = field(default_factory=ArchConfig)
    """Shape of the model built when name_or_path is None (and of the base model)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of both engines (bf16/fp16 also switch DeepSpeed's mixed precision on)."""
    trust_remote_code: bool = False
    """Passed to from_pretrained for models that ship their own code."""
    init_from_base: bool = True
    """Fine-tune the Pilot from the base model of the `base` phase (embedded default only)."""


@dataclass
class LoraConfig:
    """LoRA adapters on the Pilot (peft), as the paper fine-tunes LLaMA/Qwen Pilots (r=32, α=64).
    Applied before the Pilot's ZeRO-3 engine is built; only the adapters train."""

    enabled: bool = False
    """Fine-tune the Pilot through LoRA adapters instead of all its weights."""
    r: int = 32
    """Adapter rank."""
    alpha: float = 64.0
    """Scaling numerator: the adapter's update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names (suffixes) of the Linear layers that get adapters; for T5 use ['q', 'k', 'v', 'o',
    'wi_0', 'wi_1', 'wo']."""

    def __post_init__(self) -> None:
        _check(self.r > 0, "r", f"must be > 0 (got {self.r})")
        _check(self.alpha > 0, "alpha", f"must be > 0 (got {self.alpha})")
        _check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1) (got {self.dropout})")
        _check(len(self.target_modules) > 0, "target_modules",
               "must name at least one module, e.g. ['q_proj', 'v_proj']")


@dataclass
class PilotConfig:
    """How the Pilot is fine-tuned (the model itself is `model`)."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (off by default: full fine-tuning)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (HF gradient checkpointing): activation memory ~1 layer instead of all, ~30% more compute."""


@dataclass
class BaseConfig:
    """The base-model phase: a short pre-training on a broad generated corpus that the Pilot is
    fine-tuned from and the Copilot's blocks are initialised from (mirrors the paper's pretrained
    same-family models, which cannot be downloaded here). Cached in `<output_dir>/../base-cache`."""

    enabled: bool = True
    """Run (or reuse from cache) the base phase. Ignored when model.name_or_path is set."""
    steps: int = 400
    """Optimizer steps of the base phase."""
    lr: float = 2e-3
    """Peak learning rate (cosine schedule with warmup)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    micro_batch_size: int = 32
    """Sequences per rank per step."""
    corpus_size: int = 20000
    """Samples in the generated base corpus."""
    seed: int = 1234
    """Seed of the base model and corpus; independent of the run seed, so runs with different
    seeds share one base model, as runs of a real model share one pretrained checkpoint."""
    cache_dir: str | None = None
    """Where finished base models are cached by content hash; None: `<output_dir>/../base-cache`."""

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", "must be > 0; set base.enabled=false to skip the phase")
        _check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _check(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        _check(self.corpus_size > 0, "corpus_size", "must be > 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")


@dataclass
class CopilotConfig:
    """The Copilot (METHOD.md §2): decoder-only, alternating self / modified cross-attention."""

    hidden_size: int = 128
    """Copilot width d_C (may differ from the Pilot's d_P; memory is projected)."""
    intermediate_size: int = 344
    """SwiGLU MLP width."""
    num_layers: int = 4
    """Decoder layers; odd layers (1st, 3rd, ...) self-attend, even layers cross-attend."""
    num_heads: int = 4
    """Attention (query) heads."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention, as LLaMA-3.2 / Qwen2.5 use); None: num_heads.
    Must divide num_heads."""
    head_dim: int | None = None
    """Width of one head; None: hidden_size // num_heads. Set it for sources whose heads do not
    tile the model width (FLAN-T5-small: 6 heads x 64 on a 512-wide model)."""
    init_from: str = "base"
    """'base' (the base model of the base phase), 'none' (from scratch), or a path to a
    same-family pretrained LLaMA-style decoder whose first num_layers blocks are copied."""
    architecture: Literal["auto", "decoder_only", "encoder_decoder"] = "auto"
    """'decoder_only': alternating self / modified cross-attention layers; 'encoder_decoder':
    every layer self-attends and cross-attends to [X~ ; h] (METHOD.md §2); 'auto' follows the
    Pilot (encoder_decoder for T5-style Pilots)."""
    rope_theta: float = 10000.0
    """Rotary base for self- and cross-attention positions (a Copilot initialised from a
    pretrained decoder takes the decoder's base and RoPE scaling instead)."""
    gradient_checkpointing: bool = False
    """Recompute each Copilot layer's activations in the backward instead of keeping them."""

    def __post_init__(self) -> None:
        for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _check(getattr(self, k) > 0, k, f"must be > 0 (got {getattr(self, k)})")
        _check(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
               "hidden_size", f"must be divisible by num_heads ({self.hidden_size} % "
               f"{self.num_heads} != 0), or set copilot.head_dim")
        _check(self.head_dim is None or self.head_dim > 0, "head_dim", "must be > 0 or null")
        kv = self.num_kv_heads or self.num_heads
        _check(kv > 0 and self.num_heads % kv == 0, "num_kv_heads",
               f"must divide num_heads ({self.num_heads}); got {self.num_kv_heads}")
        _check(self.num_layers >= 2, "num_layers", "must be >= 2 (one self- and one cross-layer)")


@dataclass
class DataConfig:
    """Where samples come from and how they become token sequences."""

    source: Literal["arithmetic", "jsonl", "parquet", "hf"] = "arithmetic"
    """'arithmetic' = the embedded generator; 'jsonl'/'parquet' = local files; 'hf' = a dataset
    name for datasets.load_dataset (needs network or a local cache)."""
    train_path: str | None = None
    """jsonl/parquet: training file; hf: dataset name (e.g. 'gsm8k')."""
    val_path: str | None = None
    """jsonl/parquet: validation file; hf: unused (see hf_*_split)."""
    test_path: str | None = None
    """jsonl/parquet: test file."""
    hf_config: str | None = None
    """hf: dataset configuration name (e.g. 'main' for gsm8k)."""
    hf_train_split: str = "train"
    """hf: split used for training."""
    hf_val_split: str = "validation"
    """hf: split used for validation / choosing lambda."""
    hf_test_split: str = "test"
    """hf: split scored once at the end."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (ignored when prompt_template is set)."""
    answer_field: str = "answer"
    """Record field holding the answer."""
    prompt_template: str | None = None
    """Python format string over record fields, e.g. 'Q: {question}\\nA: '."""
    answer_template: str | None = None
    """Python format string over record fields for the answer, e.g. '{answer}'."""
    train_size: int = 20000
    """arithmetic: number of generated training problems."""
    val_size: int = 400
    """arithmetic: validation problems (lambda is chosen here)."""
    test_size: int = 800
    """arithmetic: test problems (scored once)."""
    max_length: int | Literal["auto"] = "auto"
    """Longest [BOS]+prompt+answer+EOS in tokens. 'auto': the 99.5th percentile of the training
    split's lengths rounded up to a multiple of 8, capped by the Pilot's context; resolved once
    when the run starts, printed, and saved as a number in config.yaml (tcp.data.prepare)."""
    overlength: Literal["skip", "truncate"] = "skip"
    """Samples over max_length: 'skip' drops them, 'truncate' cuts the prompt from the left.
    Either way they are counted and reported."""
    max_drop_frac: float = 0.01
    """Stop (data error, exit 2) when more than this share of the training or validation split
    is over max_length (skipped or truncated)."""
    max_unk_frac: float = 0.001
    """Stop (data error, exit 2) when more than this share of a split's tokens is the
    tokenizer's unknown token (text it cannot represent); counted only where one exists."""
    tokenizer: str | None = None
    """Tokenizer name/path; None uses the Pilot's, or builds the character tokenizer for the
    embedded default."""

    def __post_init__(self) -> None:
        _check(self.max_length == "auto" or self.max_length >= 4, "max_length",
               f"must be >= 4 or auto (got {self.max_length})")
        for k in ("max_drop_frac", "max_unk_frac"):
            _check(0 <= getattr(self, k) <= 1, k, f"must be in [0, 1] (got {getattr(self, k)})")
        for k in ("train_size", "val_size", "test_size"):
            _check(getattr(self, k) > 0, k, f"must be > 0 (got {getattr(self, k)})")
        if self.source in ("jsonl", "parquet"):
            _check(
                self.train_path is not None,
                "train_path",
                f"is required for source={self.source!r}; "
                f"set data.train_path=/path/train.{self.source}",
            )
        if self.source == "hf":
            _check(
                self.train_path is not None,
                "train_path",
                "is required for source='hf'; set it to the dataset name, "
                "e.g. data.train_path=gsm8k",
            )


@dataclass
class ZarrStoreConfig:
    """The on-disk Zarr v3 store of the Mistake Log (docs/mistake_log.md)."""

    path: str | None = None
    """Store directory; None = `<output_dir>/mistake_log`. One sub-group per rank."""
    compressor: Literal["zstd", "blosc", "none"] = "zstd"
    """Chunk compressor: zstd, blosc (zstd inside, byte-shuffle per `shuffle`) or none."""
    level: int = 3
    """Compression level (zstd: 1-22, blosc: 0-9)."""
    shuffle: bool = True
    """Blosc byte-shuffle (groups the bytes of each float; better ratios). Blosc only."""
    lossy_keepbits: int | None = None
    """If set, round the mantissa of the float32/float16 states (X~, h) to this many bits
    before compressing (numcodecs BitRound; relative error <= 2^-(keepbits+1)). None = lossless.
    Not available for bfloat16 storage."""
    chunk_mib: float = 1.0
    """Target uncompressed size of one chunk of the per-token/per-prompt-row arrays (at least
    64 rows). Small chunks make replay reads cheap (a sampled entry decodes its chunk) and the
    per-commit rewrite of the open chunk small; large ones compress slightly better."""
    shard_chunks: int = 0
    """If > 0, pack this many chunks into one shard file (Zarr sharding codec) to bound the file
    count. Each commit rewrites the open shard, so keep it small (e.g. 8-32)."""
    checksum: bool = True
    """Append a CRC32C to every chunk (Zarr's crc32c codec): corruption fails the read."""
    fsync: bool = True
    """fsync chunks and the manifest at every commit (durable across power loss, not only across
    a killed process)."""
    queue_depth: int = 8
    """Steps of entries the asynchronous writer may hold before `on_full` applies."""
    on_full: Literal["block", "drop"] = "block"
    """When the writer's queue is full: block the trainer (default), or drop the step's entries
    (counted, warned and reported; breaks exact replay)."""
    replay_lag_steps: int = 1
    """The sampler at step t replays steps [t - lag - window, t - lag): a lag of 1 gives the
    writer a whole step to commit before anyone waits on it. Sampling waits (never guesses) when
    a needed step is not committed yet."""
    read_cache_mib: float = 256.0
    """Decoded chunks the sampler keeps (LRU, sealed chunks only): replaying a window then
    re-reads little. Bounds the reader's memory whatever the log's size."""
    prefetch: int = 2
    """Replay batches the sampler reads ahead in a background thread (bounds its memory)."""
    recency_half_life: float | None = None
    """If set, replayed steps are drawn with weight 2^(-age / half_life) instead of uniformly."""
    wait_timeout_s: float = 600.0
    """Fail (naming the step) if a needed step is not committed within this many seconds."""

    def __post_init__(self) -> None:
        _check(self.chunk_mib > 0, "chunk_mib", "must be > 0")
        _check(self.shard_chunks >= 0, "shard_chunks", "must be >= 0 (0 = no sharding)")
        _check(self.queue_depth >= 1, "queue_depth", "must be >= 1")
        _check(self.replay_lag_steps >= 0, "replay_lag_steps", "must be >= 0")
        _check(self.prefetch >= 0, "prefetch", "must be >= 0")
        _check(self.read_cache_mib >= 0, "read_cache_mib", "must be >= 0")
        _check(self.wait_timeout_s > 0, "wait_timeout_s", "must be > 0")
        _check(self.recency_half_life is None or self.recency_half_life > 0,
               "recency_half_life", "must be > 0 or null")
        _check(self.lossy_keepbits is None or 0 <= self.lossy_keepbits <= 23, "lossy_keepbits",
               "must be between 0 and 23 (float32 mantissa bits) or null")
        levels = {"zstd": range(-7, 23), "blosc": range(0, 10), "none": range(-100, 100)}
        _check(self.level in levels[self.compressor], "level",
               f"{self.level} is not a valid {self.compressor} level")


@dataclass
class MistakeLogConfig:
    """The Mistake Log (METHOD.md §1)."""

    backend: Literal["zarr", "memory"] = "zarr"
    """'zarr': every entry is written asynchronously to a durable Zarr v3 store and replayed by
    a streaming sampler (`store` options). 'memory': the paper's RAM buffer of the recent window
    only (tests, tiny runs; nothing is kept)."""
    topk: int = 16
    """k of the sparse error ell_i ~ onehot(y_i) - topk(p_hat_i); k = V makes it exact."""
    window_steps: int | Literal["all"] = 128
    """Replay window: entries from the most recent N Pilot steps are eligible (paper: 128);
    'all' replays the whole log (zarr backend only)."""
    replay_size: int = 32
    """Entries replayed from the window per Copilot step (besides the current step's)."""
    include_current: bool = True
    """Also train the Copilot on the current step's entries, straight from memory."""
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of X~ and pooled h in the log."""
    store: ZarrStoreConfig = field(default_factory=ZarrStoreConfig)
    """On-disk store, writer and sampler options (backend 'zarr')."""

    def __post_init__(self) -> None:
        _check(self.topk >= 1, "topk", f"must be >= 1 (got {self.topk})")
        _check(self.window_steps == "all" or self.window_steps >= 1, "window_steps",
               "must be >= 1 or 'all'")
        _check(self.window_steps != "all" or self.backend == "zarr", "window_steps",
               "'all' needs backend: zarr (the memory backend keeps only a window)")
        _check(self.replay_size >= 0, "replay_size", "must be >= 0")
        _check(
            self.include_current or self.replay_size > 0,
            "replay_size",
            "must be > 0 when include_current is false, or the Copilot never trains",
        )
        _check(self.store.lossy_keepbits is None or self.storage_dtype != "bfloat16",
               "store.lossy_keepbits", "bit rounding has no bfloat16 variant; store float16 or "
               "float32 states, or set it to null")
        _check(self.store.lossy_keepbits is None or self.storage_dtype != "float16"
               or self.store.lossy_keepbits <= 10, "store.lossy_keepbits",
               "float16 has 10 mantissa bits; use <= 10")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO options of one engine."""

    stage: int = 3
    """ZeRO stage 0-3 (the product targets 3: parameters, gradients and optimizer partitioned)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Offload optimizer state to CPU memory."""
    offload_param: Literal["none", "cpu"] = "none"
    """Offload parameters to CPU memory (stage 3 only)."""
    overlap_comm: bool = False
    """Overlap reduction with backward (useful on GPUs)."""
    stage3_param_persistence_threshold: int = 0
    """Parameters smaller than this stay unpartitioned (0 partitions everything)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket. DeepSpeed allocates one bucket of this size per
    engine (fp32: 4 bytes each) on every rank; its own default, 5e8, costs ~1.9 GiB per engine
    even for a tiny model. Larger buckets mean fewer, larger all-reduces."""

    def __post_init__(self) -> None:
        _check(self.stage in (0, 1, 2, 3), "stage", f"must be 0, 1, 2 or 3 (got {self.stage})")
        _check(self.reduce_bucket_size > 0, "reduce_bucket_size", "must be > 0 elements")
        _check(
            self.offload_param == "none" or self.stage == 3,
            "offload_param",
            "needs stage=3; set offload_param=none or stage=3",
        )


@dataclass
class EngineConfig:
    """Optimizer, schedule and batch of one DeepSpeed engine (Pilot or Copilot)."""

    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup, in optimizer steps (one per grad_accum_steps joint steps)."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    micro_batch_size: int = 32
    """Sequences per rank per micro step (Copilot: entries per rank per step)."""
    grad_accum_steps: int = 1
    """Gradient accumulation steps."""
    adam: Literal["torch", "fused"] = "torch"
    """'torch' = torch.optim.AdamW (works everywhere); 'fused' = DeepSpeed's FusedAdam (CUDA)."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """ZeRO options."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        _check(self.grad_accum_steps > 0, "grad_accum_steps", "must be > 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1) (got {self.betas})",
        )


@dataclass
class TrainConfig:
    """The joint loop (METHOD.md §3)."""

    steps: int = 500
    """Joint steps (one Pilot step and one Copilot step each). Ignored when `epochs` is set."""
    epochs: float | None = None
    """If set, train this many passes over the training set instead of `steps`: the run
    computes steps = ceil(epochs * train samples / (pilot micro_batch_size * world size)) once
    the data is loaded, prints it and records it in the resolved config (schedules follow)."""
    log_every: int = 10
    """Progress/metric interval in steps."""
    pilot: EngineConfig = field(default_factory=lambda: EngineConfig(lr=3e-4))
    """The Pilot's engine."""
    copilot: EngineConfig = field(default_factory=lambda: EngineConfig(lr=1e-3))
    """The Copilot's engine."""
    copilot_start_step: int = 0
    """Joint step at which Copilot updates begin (entries are logged from step 0)."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for the other ranks before it fails with an error (so a
    rank that died takes the job down instead of leaving the others waiting forever)."""

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", f"must be > 0 (got {self.steps})")
        _check(self.epochs is None or self.epochs > 0, "epochs",
               f"must be > 0 or null (got {self.epochs}); null trains for train.steps")
        _check(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0 seconds")
        _check(self.log_every > 0, "log_every", "must be > 0")
        _check(self.copilot_start_step >= 0, "copilot_start_step", "must be >= 0")


@dataclass
class EvalConfig:
    """Fused decoding and scoring (METHOD.md §4, §6)."""

    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0])
    """lambda grid tried on validation; the best is used once on test."""
    fusion: Literal["probs", "logits"] = "probs"
    """'probs': p~ = p_hat + lambda f; 'logits': z + lambda f."""
    max_new_tokens: int | Literal["auto"] = "auto"
    """Decoding budget per answer. 'auto' sizes it from the tokenized training and validation
    answers (the longest, plus the longest stop string's tokens and 1 for EOS), capped by the
    Pilot's context minus the longest prompt; the choice is printed. A number wins."""
    truncation_warn_frac: float = 0.05
    """Warn (or, with strict, fail) when more than this share of a split's generations end on
    the budget without EOS or a stop string."""
    strict: bool = False
    """Truncation over truncation_warn_frac fails the run (exit 2, after results are written)
    instead of warning."""
    batch_size: int = 64
    """Prompts per rank per decoding batch."""
    enabled: bool = True
    """Evaluate at the end of training."""
    answer_format: Literal["auto", "numeric", "choice", "yesno", "exact"] = "auto"
    """How answers are scored (tcp.tasks): 'numeric' (last number; GSM8K/SVAMP/MAWPS),
    'choice' ("answer2", "option 2", "(B)", "... is answer2"), 'yesno' (BoolQ), 'exact';
    'auto' decides from the training and validation golds only (never test): the format at
    least 95% of them parse in (numeric, then yes/no, then choice), else 'exact'; the decision
    and why go to results.json["answer_format"]."""
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    """Decoding on the fused distribution: argmax, sampling, or beam search."""
    num_beams: int = 4
    """strategy=beam: beams per prompt (the paper uses 4)."""
    length_penalty: float = 1.0
    """strategy=beam: finished beams are ranked by log-prob / length**length_penalty."""
    temperature: float = 1.0
    """strategy=sample: p~ ** (1 / temperature), renormalised."""
    top_k: int = 0
    """strategy=sample: keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """strategy=sample: keep the smallest set with probability >= top_p (1.0: all)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a row ends once its decoded text contains one (cut before it), e.g.
    ["\\n"]. EOS always ends a row."""

    def __post_init__(self) -> None:
        _check(len(self.lambdas) > 0, "lambdas", "must list at least one value, e.g. [0.5, 1.0]")
        _check(all(x > 0 for x in self.lambdas), "lambdas", "values must be > 0")
        _check(self.max_new_tokens == "auto" or self.max_new_tokens > 0, "max_new_tokens",
               f"must be > 0 or 'auto' (got {self.max_new_tokens!r})")
        _check(0 <= self.truncation_warn_frac <= 1, "truncation_warn_frac",
               f"must be in [0, 1] (got {self.truncation_warn_frac}), e.g. 0.05")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.num_beams >= 1, "num_beams", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0 (use strategy=greedy for 0)")
        _check(self.top_k >= 0, "top_k", "must be >= 0 (0 keeps every token)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be a list of non-empty strings, e.g. ['\\n']")


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only; a tracking failure never stops training)."""

    enabled: bool = True
    """Log params, metrics and results to MLflow."""
    uri: str | None = None
    """Tracking URI; None = sqlite database `mlflow.db` in the parent of output_dir.
    MLFLOW_TRACKING_URI in the environment wins."""
    experiment: str = "tcp"
    """MLflow experiment name (MLFLOW_EXPERIMENT_NAME wins)."""
    run_name: str | None = None
    """MLflow run name; None uses the output directory's name."""
    close_timeout_s: float = 30.0
    """At the end, wait at most this long for queued updates to reach the tracking server."""

    def __post_init__(self) -> None:
        _check(self.close_timeout_s >= 0, "close_timeout_s", "must be >= 0")


@dataclass
class CheckpointConfig:
    """Composite checkpoints: both engines, every rank's trainer state, a manifest written last."""

    every: int = 500
    """Save every this many joint steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    dir: str | None = None
    """Where checkpoints go; None: `<output_dir>/checkpoints`. Must be visible to every rank
    (a shared filesystem on multi-node runs)."""
    on_signal: bool = True
    """On SIGTERM/SIGINT: finish the current step, flush the Mistake Log, save, exit 143/130."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "every", f"must be >= 0 (got {self.every}); 0 saves only at "
               "the end and on SIGTERM/SIGINT")
        _check(self.keep_last >= 1, "keep_last", f"must be >= 1 (got {self.keep_last})")


@dataclass
class KernelsConfig:
    """The fused kernels of `tcp.kernels` (pooling, Pilot loss, Copilot loss)."""

    fused: bool = True
    """Fused Pilot cross-entropy (LM head + loss + top-k, no (N, V) logits) and fused Copilot
    RMSE (head + loss, no (N, V) f). false: the eager paths (full logits / f), for comparison."""
    impl: Literal["auto", "torch", "triton"] = "auto"
    """Backend: 'auto' = Triton on CUDA tensors, the torch reference on CPU; 'torch'; 'triton'
    (CUDA, or CPU under TRITON_INTERPRET=1). TCP_KERNELS in the environment wins."""
    chunk_mib: float = 64.0
    """Size of the one (tokens, vocabulary) fp32 chunk buffer each fused loss works in."""

    def __post_init__(self) -> None:
        _check(self.chunk_mib > 0, "chunk_mib", f"must be > 0 MiB (got {self.chunk_mib})")


@dataclass
class RunConfig:
    """A whole run."""

    seed: int = 0
    """Seeds data generation order, initialisation and sampling."""
    output_dir: str = "runs/default"
    """Run directory: resolved config, tokenizer, checkpoints, results.json."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Pilot."""
    pilot: PilotConfig = field(default_factory=PilotConfig)
    """How the Pilot is fine-tuned: LoRA, gradient checkpointing."""
    base: BaseConfig = field(default_factory=BaseConfig)
    """The base-model phase (embedded default)."""
    copilot: CopilotConfig = field(default_factory=CopilotConfig)
    """The Copilot."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    mistake_log: MistakeLogConfig = field(default_factory=MistakeLogConfig)
    """The Mistake Log."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The joint loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    """Fused kernels."""
    resume: str | None = None
    """None: a fresh run (a previous run's checkpoints and Mistake Log in the same place are
    replaced). 'auto': continue from the latest complete checkpoint if there is one, else
    start fresh. A path: that checkpoint (a `step_*` folder, or a checkpoint directory whose
    `latest` is used)."""

    def __post_init__(self) -> None:
        # Cross-section checks; keys are given in full because they span sections.
        if self.model.name_or_path is None and self.model.arch.family == "t5":
            _check(not self.base.enabled, "base.enabled",
                   "the base phase pre-trains a LLaMA; with model.arch.family=t5 set "
                   "base.enabled=false (and copilot.init_from=none)")
        if self.copilot.init_from == "base":
            _check(
                self.model.name_or_path is None and self.base.enabled,
                "copilot.init_from",
                "'base' needs the base phase (model.name_or_path unset, base.enabled=true); "
                "use copilot.init_from=none or a path to a pretrained decoder",
            )
            _check(
                self.copilot.hidden_size == self.model.arch.hidden_size
                and self.copilot.num_layers <= self.model.arch.num_layers
                and self.copilot.num_heads == self.model.arch.num_heads
                and self.copilot.intermediate_size == self.model.arch.intermediate_size,
                "copilot",
                "init_from=base copies base blocks, so hidden_size, num_heads and "
                "intermediate_size must equal model.arch's and num_layers <= model.arch.num_layers",
            )
        if self.data.source == "arithmetic" and self.model.name_or_path is None:
            _check(
                self.data.tokenizer is None,
                "data.tokenizer",
                "the embedded default builds its own character tokenizer; unset data.tokenizer",
            )


# ----------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checks, unknown keys rejected, errors prefixed by path.


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce) `value` against annotation `tp`. Returns (ok, value)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        (arg,) = typing.get_args(tp) or (Any,)
        out = []
        for item in value:
            ok, v = _type_ok(item, arg)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return str(tp).replace("typing.", "")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; every error names the dotted key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"{where}: unknown key. Valid keys under '{prefix.rstrip('.') or '<top>'}': "
            f"{', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        tp, value = hints[name], data[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            kwargs[name] = from_dict(tp, value, prefix=f"{key}.")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        kwargs[name] = coerced
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps and MLflow params)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` (value read as YAML: numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.pilot.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), _yaml_floats(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted overrides applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml_floats(data: Any) -> Any:
    """PyYAML (YAML 1.1) reads `3e-4` as a string; turn such strings into the floats users mean."""
    if isinstance(data, dict):
        return {k: _yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_yaml_floats(v) for v in data]
    if isinstance(data, str) and _SCI.match(data.strip()):
        return float(data)
    return data


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One config file as a dict; `extends: other.yaml` (relative to the file) is read first
    and this file's values are merged over it, section by section."""
    if not p.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"--config: file not found: {p}{where}")
    if p.resolve() in chain:
        raise ConfigError(f"--config {p}: `extends` loops back to itself")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--config {p}: top level must be a mapping of sections")
    data = _yaml_floats(loaded or {})
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"--config {p}: extends must be a file path, e.g. extends: default.yaml")
    return _merge(_read_yaml(p.parent / parent, (*chain, p.resolve())), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved with every run)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# DeepSpeed configs: each engine gets its own, rendered from the same RunConfig.


def resolve_epochs(cfg: RunConfig, *, num_samples: int, world_size: int) -> RunConfig:
    """`cfg` with `train.steps` derived from `train.epochs` (unchanged when epochs is None):
    one step consumes `pilot.micro_batch_size` samples on each of `world_size` ranks."""
    if cfg.train.epochs is None:
        return cfg
    per_step = cfg.train.pilot.micro_batch_size * world_size
    steps = max(1, math.ceil(cfg.train.epochs * num_samples / per_step))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def engine_config(cfg: RunConfig, engine: Literal["pilot", "copilot", "base"]) -> EngineConfig:
    """The engine settings of `engine`; the base phase borrows the Pilot's ZeRO/Adam settings."""
    if engine == "base":
        p = cfg.train.pilot
        return EngineConfig(lr=cfg.base.lr, warmup_steps=cfg.base.warmup_steps,
                            micro_batch_size=cfg.base.micro_batch_size, adam=p.adam,
                            zero=p.zero, grad_clip=p.grad_clip)
    return getattr(cfg.train, engine)


def render_deepspeed(cfg: RunConfig, engine: Literal["pilot", "copilot", "base"], *,
                     world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine (each engine gets its own)."""
    e = engine_config(cfg, engine)
    micro_steps = cfg.base.steps if engine == "base" else cfg.train.steps
    # DeepSpeed steps the scheduler once per optimizer step, i.e. every grad_accum_steps
    # micro steps (one joint step = one micro step).
    steps = math.ceil(micro_steps / e.grad_accum_steps)
    z = e.zero
    zero: dict[str, Any] = {"stage": z.stage, "overlap_comm": z.overlap_comm,
                            "reduce_bucket_size": z.reduce_bucket_size}
    if z.stage == 3:
        zero["stage3_param_persistence_threshold"] = z.stage3_param_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer}
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param}
    sched: dict[str, Any]
    if e.schedule == "cosine":
        sched = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(steps, e.warmup_steps + 1),
                "warmup_num_steps": e.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": e.min_lr_ratio,
            },
        }
    else:
        sched = {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": e.lr,
                       "warmup_num_steps": max(e.warmup_steps, 1), "warmup_type": "linear"},
        }
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": e.micro_batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "train_batch_size": e.micro_batch_size * e.grad_accum_steps * world_size,
        "gradient_clipping": e.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": e.lr,
                "betas": list(e.betas),
                "weight_decay": e.weight_decay,
                "torch_adam": e.adam == "torch",
            },
        },
        "scheduler": sched,
        "steps_per_print": 10**9,  # progress is ours (rank-0 bar), not DeepSpeed's log spam
        "wall_clock_breakdown": False,
    }
    if cfg.model.dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    elif cfg.model.dtype == "float16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds
