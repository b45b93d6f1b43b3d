"""`train.pilot` and `train.copilot` (each with its `zero`): one DeepSpeed engine's optimizer,
schedule, batch and ZeRO options (the DeepSpeed config dict is rendered from them in
deepspeed.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcp.config.schema import _check


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
