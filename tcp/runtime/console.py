"""The console: rank-0 printing and a rank-0 progress bar (tqdm) that degrades to periodic lines
when output is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch.distributed as dist
from tqdm import tqdm


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


def print_rank0(*a: Any) -> None:
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def elapsed(t0: float) -> str:
    """Seconds since t0, formatted."""
    return f"{time.time() - t0:.1f}s"
