"""SIGTERM/SIGINT -> a clean stop at the next step boundary, agreed by every rank.

Schedulers (SLURM, Kubernetes) send SIGTERM before they kill; the `deepspeed` launcher forwards
SIGTERM/SIGINT to the ranks and waits 30 s before SIGKILL. The handler only records the signal;
the loop asks `should_stop()` once per step, which all-reduces the flag so every rank stops after
the same step even when the signal reached them at different moments. A second signal of the
same kind restores the default handler and re-raises it (a forced stop).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

_HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Installs the handlers on `install()`, restores the previous ones on `restore()`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signum:  # second time: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def should_stop(self, device: torch.device) -> int | None:
        """The signal any rank received (collective when distributed), else None."""
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        got = int(flag.item())
        return got or None

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    @staticmethod
    def exit_code(signum: int) -> int:
        """Shell convention: 128 + signal number (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + signum
