"""The process group both engines share: start it (NCCL on CUDA, gloo on CPU), under the
`deepspeed` launcher, `srun` (SLURM's variables mapped to torch's) or a plain `python`."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tcp.errors import RunError
from tcp.runtime.quiet import deepspeed_init


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """Initialise the one process group both engines share. Returns (rank, world, device).

    NCCL on CUDA hosts, gloo on CPU. On CPU each rank takes its share of the cores
    (`threads_per_rank`): oversubscription makes every collective wait on the slowest rank.
    `timeout_s` bounds every collective: a rank waiting on a dead peer fails instead of hanging.
    """
    # DeepSpeed picks its accelerator when imported: only after DS_ACCELERATOR is set below.
    cuda = torch.cuda.is_available()
    if not cuda:
        # Before DeepSpeed is imported: it picks its accelerator on import, and without this
        # warns on every rank that it fell back to the CPU ("Setting accelerator to CPU").
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(threads_per_rank(os.environ, available_cores()))
    import deepspeed  # heavy; it picks its accelerator on import

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


def threads_per_rank(env: Mapping[str, str], cores: int) -> int:
    """CPU threads of one rank: $TCP_THREADS_PER_RANK, else the CPUs this process may use
    (`cores`, or SLURM's cpus per task when set) shared by the ranks its launcher started on this
    node (the deepspeed launcher's LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE; 1 under `srun` one
    task per rank); at least 1. Results differ slightly with it (the summation order of a matmul
    changes)."""
    explicit = _threads_setting(env, "TCP_THREADS_PER_RANK")
    if explicit is not None:
        return explicit
    cores = _threads_setting(env, "SLURM_CPUS_PER_TASK") or cores
    local = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or "1")
    return max(1, cores // max(1, local))


def _threads_setting(env: Mapping[str, str], key: str) -> int | None:
    """`env[key]` as a positive count of threads, None when unset or empty."""
    if not env.get(key):
        return None
    try:
        n = int(env[key])
    except ValueError:
        raise RunError(f"{key}={env[key]!r}: must be a whole number of threads, e.g. 4") from None
    if n < 1:
        raise RunError(f"{key}={n}: must be >= 1")
    return n


def available_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's CPU limit does not shrink the mask)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
