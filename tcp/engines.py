"""Distributed setup and the two DeepSpeed engines: build, save and gather to HF format."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tcp.errors import RunError


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Initialise the one process group both engines share. Returns (rank, world, device).

    NCCL on CUDA hosts, gloo on CPU. On CPU each rank uses a single intra-op thread: ranks are
    already one per core, and oversubscription makes every collective wait on the slowest rank.
    `timeout_s` bounds every collective: a rank waiting on a dead peer fails instead of hanging.
    """
    from datetime import timedelta

    from tcp.quiet import deepspeed_init

    cuda = torch.cuda.is_available()
    if not cuda:
        # Before DeepSpeed is imported: it picks its accelerator on import, and without this
        # warns on every rank that it fell back to the CPU ("Setting accelerator to CPU").
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(int(os.environ.get("TCP_THREADS_PER_RANK", "1")))
    import deepspeed

    if not dist.is_initialized():
        for k, v in slurm_env(os.environ).items():  # `srun` one task per rank
            os.environ.setdefault(k, v)
        launched = "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
        if not launched:  # plain `python launcher/train.py`: one process, no MPI probing
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
                os.environ.setdefault(k, v)
        with deepspeed_init():  # without its "<op> built successfully" line on every rank
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                       auto_mpi_discovery=launched,
                                       timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda and world > 1:
        release_shm_name(rank)
    if cuda:
        # Modulo: under `srun --gpus-per-task=1` each task sees only its own GPU, as device 0.
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def release_shm_name(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name. Collective (a barrier first).

    DeepSpeed's CPU backend maps one shared-memory buffer per rank on a node
    (/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, ~64 MiB) and
    never unlinks it, so every CPU run would leave its buffers in RAM until the machine
    reboots. By the barrier every rank has mapped every peer's buffer, so the names can go; the
    memory itself is freed when the last rank exits, however it exits (SIGKILL included)."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def slurm_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch's rendezvous variables from SLURM's, for ranks started by `srun` directly (one
    task per rank, no DeepSpeed launcher): RANK, WORLD_SIZE, LOCAL_RANK from SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID. MASTER_ADDR must come from the job script (the first host of
    the allocation); MASTER_PORT defaults to 29500. Empty when not under srun, when a launcher
    already set RANK, or for a single task (a `deepspeed` runner started by srun)."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return {}
    if "MASTER_ADDR" not in env:
        raise RunError("srun started several tasks, but MASTER_ADDR is not set; export it in "
                       "the job script, e.g. MASTER_ADDR=$(scontrol show hostnames "
                       "\"$SLURM_JOB_NODELIST\" | head -n 1)")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_PORT": "29500"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_engine(model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """`deepspeed.initialize` with the optimizer and scheduler described in `ds_config`."""
    import deepspeed

    from tcp.quiet import engine_build

    with engine_build():  # its schedulers warn about their own construction (tcp.quiet)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
        )
    return engine


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full (unpartitioned) CPU state dict on rank 0, None elsewhere. Collective: call on all.

    Under ZeRO-3 the parameters are gathered one at a time and copied to rank 0's host memory,
    so no device ever holds more than its shard plus one full parameter (gathering the whole
    model at once would put all of a 7B Pilot on every GPU).
    """
    import deepspeed

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
    from tcp.models.lora import is_peft

    if is_peft(module):  # its save_pretrained would write the adapter alone as "the model"
        raise TypeError(f"{path}: a LoRA (peft) model is saved with save_hf_lora")
    from tcp.quiet import hf_progress_off

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
    from tcp.models.lora import adapter_state_dict, merge_state_dict
    from tcp.quiet import hf_progress_off

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
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(sd, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()
