"""SIGTERM/SIGINT -> a clean stop at the next step boundary, agreed by every rank.

Schedulers send SIGTERM before they kill: SLURM to every process of the job step, Kubernetes to
the container's first process, a user to the `deepspeed` runner. The handler only records the
signal; the loop asks `should_stop()` once per step, which all-reduces the flag so every rank
stops after the same step even when the signal reached them at different moments.

- The same stop often arrives twice within milliseconds (SLURM signals a rank, and DeepSpeed's
  `launch.py`, signalled too, signals it again). Signals within `REPEAT_WINDOW_S` of the first
  count as one. A later second signal restores the default handler and re-raises it: an
  operator's forced stop.
- `LauncherWatch` covers what DeepSpeed does not forward: its runner (`deepspeed ...`) installs
  no handler on a single node or with `--no_ssh`, so a SIGTERM to it ends the runner and
  orphans the ranks. Each rank watches its launcher chain (launch.py, and the runner above it)
  and treats its disappearance like SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

_HANDLED = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class StopSignal:
    """Installs the handlers on `install()`, restores the previous ones on `restore()`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.reason = ""
        """What stopped us, in words (a signal, or the launcher that went away)."""
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in _HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.notify(signum, f"signal {signum}")
        elif time.monotonic() - self._first_at > REPEAT_WINDOW_S:  # a deliberate second one
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)

    def notify(self, signum: int, reason: str) -> None:
        """Record a stop request (the handler, or a watcher thread on the launcher's exit)."""
        if self.received is None:
            self.received, self.reason, self._first_at = signum, reason, time.monotonic()

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


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, command line) of `pid` from /proc; None when it is gone or unreadable."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return ppid, cmd


def launcher_chain() -> list[int]:
    """The pids of the DeepSpeed processes above this rank: launch.py (our parent) and, above
    it, the `deepspeed` runner when there is one. Empty when not
    launched by DeepSpeed (plain `python launcher/train.py`: a shell's exit must not stop us)
    or where there is no /proc."""
    chain: list[int] = []
    pid = os.getppid()
    for marker in ("deepspeed.launcher.launch", "deepspeed"):
        st = _stat(pid)
        if st is None or marker not in st[1]:
            break
        chain.append(pid)
        pid = st[0]
    return chain


class LauncherWatch:
    """A daemon thread that calls `stop.notify(SIGTERM, ...)` when a process of the launcher
    chain exits. Polls every `interval_s`."""

    def __init__(self, stop: StopSignal, *, interval_s: float = 1.0,
                 chain: list[int] | None = None) -> None:
        self.stop, self.interval_s = stop, interval_s
        self.chain = launcher_chain() if chain is None else chain
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LauncherWatch:
        if self.chain:
            self._thread = threading.Thread(target=self._run, name="tcp-launcher-watch",
                                            daemon=True)
            self._thread.start()
        return self

    def gone(self) -> str | None:
        """Which launcher process went away, in words; None while all are there. Only the
        chain itself is watched, never what is above the runner (a shell that exits after
        `nohup deepspeed ... &` stops nothing)."""
        launch = self.chain[0]
        if os.getppid() != launch:
            return f"DeepSpeed's launch.py (pid {launch}) exited"
        if len(self.chain) > 1:
            runner = self.chain[1]
            st = _stat(launch)
            # launch.py is reparented the moment the runner exits (before it is reaped).
            if st is not None and st[0] != runner:
                return f"the deepspeed runner (pid {runner}) exited"
        return None

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            why = self.gone()
            if why is not None:
                self.stop.notify(signal.SIGTERM, why)
                return

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
