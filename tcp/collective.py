"""Collectives that let every rank agree on an outcome: an error one rank met is raised by all
ranks alike (no rank left waiting in a collective the others have abandoned). Used by the
checkpoint protocol (tcp.checkpoint), the storage checks and the run's folder claim."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tcp.errors import RunError

E = TypeVar("E", bound=RunError)


def distributed() -> bool:
    """Whether more than one rank takes part (collectives are needed)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where a collective's tensor lives: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on(mine: E | None) -> E | None:
    """Collective, in place of a barrier: None when no rank has an error, else, on every rank,
    the error of the lowest rank that has one (naming the other ranks that failed). A save that
    works pays one all_reduce of a flag per rank, what the barrier cost; the messages are
    gathered only when some rank failed."""
    if not distributed():
        return mine
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_comm_device())
    flags[dist.get_rank()] = int(mine is not None)
    dist.all_reduce(flags)
    failed = [int(r) for r in flags.nonzero().flatten().tolist()]
    if not failed:
        return None
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, None if mine is None else (type(mine), str(mine)))
    if failed == [dist.get_rank()]:
        return mine  # keeps its __cause__
    cls, text = every[failed[0]]
    if len(failed) > 1:
        text += f" (rank{'s' * (len(failed) > 2)} {', '.join(map(str, failed[1:]))} failed too)"
    return cls(text)


def shutdown() -> None:
    """Destroy the process group before the process exits. Without it, gloo's worker threads
    outlive the interpreter's teardown and the process can die of SIGABRT ("terminate called
    without an active exception", exit 134 or the launcher's 250) after a clean finish or a
    one-line error. Call it where every rank ends the same way (a result, an agreed error),
    not after an unexpected exception: under NCCL, destroying while a peer still waits in a
    collective can hang. A no-op when no group exists."""
    if dist.is_initialized():
        dist.destroy_process_group()
