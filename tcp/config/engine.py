"""`train.pilot` and `train.copilot` (each with its `zero`): one DeepSpeed engine's optimizer,
schedule, batch and ZeRO options, and the DeepSpeed config dict rendered from them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tcp.config.schema import _check

if TYPE_CHECKING:
    from tcp.config.run import RunConfig


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


# ----------------------------------------------------------------------------------------------
# DeepSpeed configs: each engine gets its own, rendered from the same RunConfig.


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
    micro_steps = {"base": cfg.base.steps, "pilot": cfg.train.steps,
                   "copilot": cfg.train.total_steps}[engine]
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
