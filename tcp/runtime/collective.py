"""Collectives that let every rank agree on an outcome: an error one rank met is raised by all
ranks alike (no rank left waiting in a collective the others have abandoned). Used by the
checkpoint protocol (tcp.training.checkpoint), the storage checks and the run's folder claim."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

from tcp.errors import RunError


def distributed() -> bool:
    """Whether more than one rank takes part (collectives are needed)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where a collective's tensor lives: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(error: BaseException | None) -> RunError | None:
    """Collective, in place of a barrier: None when no rank has an error; else, on every rank,
    the error of the lowest rank that has one, as a `RunError` of the same class and kind (a
    non-`RunError` becomes a `RunError` naming its type), its message on one line, prefixed
    "rank N: " when N is not 0 and the message does not name it, and naming the other ranks
    that failed. The failing rank gets
    its own error object back (its `__cause__` kept). A step that works pays one all_reduce of
    a flag per rank, what a barrier costs; messages are gathered only when some rank failed.
    Call it on every rank, with None when this rank is fine."""
    mine = None if error is None else _as_run_error(error)
    if not distributed():
        return mine
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_comm_device())
    flags[dist.get_rank()] = int(mine is not None)
    dist.all_reduce(flags)
    failed = [int(r) for r in flags.nonzero().flatten().tolist()]
    if not failed:
        return None
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, None if mine is None else (type(mine), mine.kind, str(mine)))
    first = failed[0]
    cls, kind, text = every[first]
    if first != 0 and not re.search(rf"\brank {first}\b", text):
        text = f"rank {first}: {text}"  # which rank, unless the message says so already
    if len(failed) > 1:
        text += f" (rank{'s' * (len(failed) > 2)} {', '.join(map(str, failed[1:]))} failed too)"
    if failed == [dist.get_rank()] and mine is not None and str(mine) == text:
        return mine  # keeps its __cause__
    agreed = _rebuild(cls, text)
    agreed.kind = kind
    if first == dist.get_rank() and mine is not None:
        agreed.__cause__ = mine.__cause__
    return agreed


def raise_if_any(error: BaseException | None) -> None:
    """`agree(error)`, raising the agreed error on every rank when some rank had one."""
    agreed = agree(error)
    if agreed is not None:
        raise agreed


def _as_run_error(error: BaseException) -> RunError:
    if isinstance(error, RunError):
        if " ".join(str(error).split()) == str(error):
            return error
        one_line = _rebuild(type(error), " ".join(str(error).split()))
        one_line.kind = error.kind
        one_line.__cause__ = error.__cause__
        return one_line
    wrapped = RunError(" ".join(f"{type(error).__name__}: {error}".split()))
    wrapped.__cause__ = error
    return wrapped


def _rebuild(cls: type[RunError], text: str) -> RunError:
    """An error of class `cls` with message `text` (a `RunError` when `cls` wants other
    arguments)."""
    try:
        return cls(text)
    except TypeError:
        return RunError(text)


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Elementwise sum of `values` over every rank, in float64 (identity without a process
    group): the one reduction of training metrics and evaluation counts. Collective."""
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(summed)
    return summed.tolist()


def shutdown() -> None:
    """Destroy the process group before the process exits. Without it, gloo's worker threads
    outlive the interpreter's teardown and the process can die of SIGABRT ("terminate called
    without an active exception", exit 134 or the launcher's 250) after a clean finish or a
    one-line error. Call it where every rank ends the same way (a result, an agreed error),
    not after an unexpected exception: under NCCL, destroying while a peer still waits in a
    collective can hang. A no-op when no group exists."""
    if dist.is_initialized():
        dist.destroy_process_group()
