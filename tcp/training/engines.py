"""The DeepSpeed engines: build one, gather a ZeRO-3 model's weights, save final models (HF format
for the Pilot, a state dict for the Copilot)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tcp.models.lora import adapter_state_dict, is_peft, merge_state_dict
from tcp.runtime.atomic import atomic_write
from tcp.runtime.quiet import engine_build, hf_progress_off


def build_engine(model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """`deepspeed.initialize` with the optimizer and scheduler described in `ds_config`."""
    import deepspeed  # heavy; and it picks its accelerator on import (init_distributed first)

    with engine_build():  # its schedulers warn about their own construction (tcp.runtime.quiet)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
        )
    return engine


def param_count(model: torch.nn.Module) -> int:
    """Full parameter count, also when ZeRO-3 has left each rank only a shard."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) CPU state dict on rank 0, None elsewhere. Collective: call on all.

    Under ZeRO-3 the parameters are gathered one at a time and copied to rank 0's host memory,
    so no device ever holds more than its shard plus one full parameter (gathering the whole
    model at once would put all of a 7B Pilot on every GPU).
    """
    import deepspeed  # heavy; it picks its accelerator on import

    named = dict(module.named_parameters(remove_duplicate=False))  # tied names included
    zero3 = any(hasattr(p, "ds_id") for p in named.values())
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not zero3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
            if rank == 0 else None
    full: dict[int, torch.Tensor] = {}
    for p in module.parameters():  # the same order on every rank
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                full[id(p)] = p.detach().cpu().clone()
    if rank != 0:
        return None
    out = {}
    for k, v in module.state_dict().items():  # partitioned entries are empty placeholders
        if k in named:
            out[k] = full[id(named[k])]
        else:  # buffers and extra state are not partitioned
            out[k] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    return out


def _tmp_dir(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_hf(module: nn.Module, path: Path) -> None:
    """Save an HF model held by a (possibly ZeRO-3) engine in `save_pretrained` format.

    Written to a temporary folder and renamed, so an interrupted save never leaves a half model.
    """
    if is_peft(module):  # its save_pretrained would write the adapter alone as "the model"
        raise TypeError(f"{path}: a LoRA (peft) model is saved with save_hf_lora")

    sd = gathered_state_dict(module)
    if sd is not None:
        tmp = _tmp_dir(path)
        with hf_progress_off():
            module.save_pretrained(tmp, state_dict=sd)
        _publish(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def save_hf_lora(module: nn.Module, path: Path, adapter_path: Path) -> None:
    """Save a LoRA Pilot (a peft model, possibly ZeRO-3) twice: merged into its base weights as
    a plain HF model at `path` (loads with `from_pretrained`, no peft), and the adapter alone in
    peft's `save_pretrained` format at `adapter_path`. Collective; rank 0 writes.

    Rank 0 holds the gathered model once: the merge replaces base weights in place. Both folders
    are written to temporary folders first and renamed only when both are complete.
    """
    sd = gathered_state_dict(module)
    if sd is not None:
        adapter = adapter_state_dict(module, sd)
        tmp_adapter = _tmp_dir(adapter_path)
        with hf_progress_off():
            module.save_pretrained(tmp_adapter, state_dict=adapter)
        merged = merge_state_dict(module, sd)
        del sd
        tmp = _tmp_dir(path)
        with hf_progress_off():
            module.get_base_model().save_pretrained(tmp, state_dict=merged)
        _publish(tmp, path)
        _publish(tmp_adapter, adapter_path)
    if dist.is_initialized():
        dist.barrier()


def save_module(module: nn.Module, path: Path) -> None:
    """Save a plain module's full state dict (gathered under ZeRO-3) atomically, rank 0."""
    sd = gathered_state_dict(module)
    if sd is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(sd, f))
    if dist.is_initialized():
        dist.barrier()
