"""The DeepSpeed config of each engine (Pilot, Copilot, the base phase), rendered from the same
RunConfig: optimizer, schedule, batch and ZeRO settings from `train.pilot` / `train.copilot`
(engine.py)."""

from __future__ import annotations

import math
from typing import Any, Literal

from tcp.config.engine import EngineConfig
from tcp.config.run import RunConfig


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
