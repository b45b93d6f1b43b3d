"""The models: the Pilot (`model`, `model.arch`), how it is fine-tuned (`pilot`, `pilot.lora`),
the base-model phase (`base`) and the Copilot (`copilot`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tcp.config.schema import _check

BASE_FORMATS = ("equation", "word", "choice", "choice_value_first", "choice_walk", "yesno",
                "yesno_value_first")
"""Sample formats of the base corpus (`base.formats`): a plain equation "34+25=" -> "59"; a word
problem in a base phrasing; the equation with four near-miss options, answered "the correct
answer is answerN"; a claimed equation "Is 34+25=59?" -> "yes"/"no"; 'choice_value_first' and
'yesno_value_first', laid out as the earlier choice family and the yes/no family answer
("59 is answer2, so the correct answer is answer2"; "59, so no"); and 'choice_walk', the choice
family's layout ("59. answer1: 58 no, answer2: 59 yes, so the correct answer is answer2"). None
uses the tasks' wording, as a pretrained model has seen arithmetic, multiple choice and yes/no
questions, but not the fine-tuning task."""


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
    same-family models, which cannot be downloaded here). Cached by content key in tcp's cache
(`$TCP_CACHE_DIR`, else `$XDG_CACHE_HOME/tcp`, else `~/.cache/tcp`; under `base/`); the
configs/default.yaml base model ships with tcp (tcp/assets/base/), so it is never pre-trained."""

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
    formats: list[str] = field(default_factory=lambda: ["equation", "word"])
    """Sample formats of the base corpus, drawn with equal odds (`BASE_FORMATS` above;
    generated by tcp.data.arithmetic): 'equation' ("34+25=" -> "59"), 'word' (word problems in
    phrasings the tasks do not use), 'choice' (an equation with four options, answered "the
    correct answer is answerN"), 'choice_value_first' (the same, options "59 is answer2",
    answered "59 is answer2, so the correct answer is answer2"), 'choice_walk' (the choice
    family's layout: options "answer2: 59", answered "59. answer1: 58 no, answer2: 59 yes, so
    the correct answer is answer2"),
    'yesno' ("Is 34+25=59?" -> "yes"/"no"), 'yesno_value_first' (the yes/no family's gold:
    "Is 34+25=47?" -> "59, so no", a false claim being another equation's result)."""
    cache_dir: str | None = None
    """Where finished base models are cached by content key; None: `base/` in tcp's cache
    (`$TCP_CACHE_DIR`, else `$XDG_CACHE_HOME/tcp`, else `~/.cache/tcp`). Set it to storage every
    node sees when that cache is on a node's local disk."""

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", "must be > 0; set base.enabled=false to skip the phase")
        _check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _check(self.micro_batch_size > 0, "micro_batch_size", "must be > 0")
        _check(self.corpus_size > 0, "corpus_size", "must be > 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        bad = [f for f in self.formats if f not in BASE_FORMATS]
        _check(bool(self.formats) and not bad, "formats",
               f"must be a non-empty list of {', '.join(BASE_FORMATS)} (got {self.formats})")


@dataclass
class CopilotConfig:
    """The Copilot (docs/method.md §4): decoder-only, alternating self / modified
    cross-attention."""

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
    every layer self-attends and cross-attends to [X~ ; h] (docs/method.md §4); 'auto' follows the
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
