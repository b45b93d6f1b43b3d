"""The console: tcp's messages through Python `logging` (the `tcp` logger, rank 0 only; level
from `--log-level` or `TCP_LOG_LEVEL`) and a rank-0 progress bar (tqdm) that degrades to periodic
lines when output is not a terminal. Progress bars and the result table are not log messages:
they are printed at any level."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from tcp.config import ConfigError


class Progress:
    """Progress of a loop; silent on ranks other than 0."""

    def __init__(self, *, total: int, desc: str, enabled: bool, initial: int = 0) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.desc, self.total = desc, total
        self._last_line = 0.0
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, initial=initial) \
            if enabled and self.tty else None

    def update(self, done: int, **fields: str) -> None:
        """Set progress to `done` steps with postfix fields."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix(fields, refresh=True)
            return
        now = time.time()
        if now - self._last_line >= 5 or done == self.total:  # logs: a line every 5 s at most
            self._last_line = now
            kv = " ".join(f"{k}={v}" for k, v in fields.items())
            print(f"[{self.desc}] {done}/{self.total} {kv}", flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


logger = logging.getLogger("tcp")
"""tcp's logger. Messages keep their console form ("[tcp] ...", "[tcp-eval] ...")."""

LEVELS = ("debug", "info", "warning", "error")
"""Values of `--log-level` and `TCP_LOG_LEVEL`."""


class _Rank0(logging.Filter):
    """Passes records on rank 0 (or before/without a process group) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Without torch.distributed imported there is no process group (and no torch to load:
        # the command lines log before they import it).
        dist = sys.modules.get("torch.distributed")
        return dist is None or not dist.is_initialized() or dist.get_rank() == 0


class _Console(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on sys.stdout or sys.stderr as they are when a record is written (not when the
    handler was made), so a redirected or captured stream gets later records."""

    def __init__(self, name: str) -> None:
        self.name_of_stream = name
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys stream


def setup_logging(level: str | None = None) -> None:
    """Send the `tcp` logger to the console: info and debug to stdout, warnings and errors to
    stderr, on rank 0. `level` (one of LEVELS), else $TCP_LOG_LEVEL, else info; another value is
    a ConfigError. Called by the
    command lines and by every job; only the first call that finds the logger without handlers
    adds them, so an application that configured `tcp` itself keeps its setup."""
    name = (level or os.environ.get("TCP_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        where = "" if level else "TCP_LOG_LEVEL: "
        raise ConfigError(f"{where}log level {name!r}: use one of {', '.join(LEVELS)}")
    if level is not None or not logger.handlers:
        logger.setLevel(name.upper())
    if logger.handlers:
        return
    out = _Console("stdout")
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = _Console("stderr")
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_Rank0())
        logger.addHandler(handler)
    logger.propagate = False


def elapsed(t0: float) -> str:
    """Seconds since t0, formatted."""
    return f"{time.time() - t0:.1f}s"
