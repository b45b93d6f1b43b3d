"""Streaming sampler: replay batches read back from a rank's committed Mistake Log entries.

What is drawn at step t is a pure function of (seed, t, rank) and the log's content in the
window of steps [t - lag - window, t - lag) ('all': [0, t - lag)). The sampler waits until the
trainer has submitted every step of the window; steps not committed yet are read from the
writer's memory in their stored form (`view.py`), so the writer's timing never changes a
draw, and a draw never waits for a commit. A background
thread reads up to `prefetch` steps ahead, and only steps whose window the trainer has already
submitted, so memory is bounded by `prefetch` batches whatever the log's size, and a prefetch
never waits on the trainer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.base import sample_generator
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.staging import Uncommitted
from tcp.mistake_log.view import LogView


class StreamingSampler:
    """Draws `num` entries per step from one rank's shard."""

    def __init__(self, reader: RankStoreReader, *, seed: int, rank: int, num: int,
                 window_steps: int | None = 128, lag_steps: int = 0,
                 recency_half_life: float | None = None, prefetch: int = 2,
                 tail: Callable[[int], Uncommitted] | None = None,
                 submitted: Callable[[int], bool] | None = None) -> None:
        """`tail(s)` waits until steps <= s are submitted and returns the writer's uncommitted
        entries (the in-process writer's `uncommitted`); `submitted(s)` says whether the
        trainer has handed over step s (gates prefetching). Both None for a finished log read
        offline."""
        self.reader, self.seed, self.rank, self.num = reader, seed, rank, num
        self.window_steps, self.lag = window_steps, lag_steps
        self.half_life = recency_half_life
        self.prefetch = prefetch
        self._tail, self._submitted = tail, submitted
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"tcp-mlog-reader-r{rank}") \
            if prefetch > 0 else None
        self._futures: dict[int, Future[MistakeBatch | None]] = {}
        self.last_step: int | None = None
        self.wait_s = 0.0
        """Time `sample()` spent waiting for a batch (steps not submitted or reads not done)."""

    # -------------------------------------------------------------- the draw
    def window(self, step: int) -> tuple[int, int]:
        """[lo, hi) of steps eligible at `step`."""
        hi = step - self.lag
        lo = 0 if self.window_steps is None else hi - self.window_steps
        return max(lo, 0), max(hi, 0)

    def draw(self, step: int) -> MistakeBatch | None:
        """The replay batch of `step` (entries in log order), or None if the window is empty."""
        lo, hi = self.window(step)
        if hi <= lo or self.num <= 0:
            return None
        view = LogView(self.reader, None if self._tail is None else self._tail(hi - 1), hi - 1)
        e0, e1 = view.entry_range(lo, hi)
        total = e1 - e0
        if total <= 0:
            return None
        g = sample_generator(self.seed, step, self.rank)
        if self.half_life is None:
            flat = torch.randint(total, (self.num,), generator=g) if self.num > total else \
                torch.randperm(total, generator=g)[: self.num]
            idx = e0 + flat.numpy()
        else:
            idx = self._recency_draw(view, lo, hi, g)
        return view.read(np.sort(idx))

    def _recency_draw(self, view: LogView, lo: int, hi: int, g: torch.Generator) -> np.ndarray:
        """Steps with weight 2^(-age/half_life) (inverse CDF, no enumeration of the window),
        then an entry uniformly within the step; with replacement."""
        span = hi - lo
        tail = 1.0 - 2.0 ** (-span / self.half_life)  # type: ignore[operator]
        out: list[int] = []
        tries = 0
        while len(out) < self.num:
            tries += 1
            if tries > 100 * self.num:  # only possible if most steps of the window are empty
                break
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            age = min(span - 1, int(-self.half_life * math.log2(1.0 - u * tail)))  # type: ignore[operator]
            s = hi - 1 - age
            a, b = view.entry_range(s, s + 1)
            if b > a:
                out.append(a + int(torch.randint(b - a, (), generator=g)))
        return np.asarray(out, dtype=np.int64)

    # -------------------------------------------------------------- prefetching
    def sample(self, step: int) -> MistakeBatch | None:
        """`draw(step)`, served from the prefetch thread when it already read it."""
        t0 = time.perf_counter()
        if self._pool is None:
            out = self.draw(step)
        else:
            fut = self._futures.pop(step, None) or self._pool.submit(self.draw, step)
            for s in [s for s in self._futures if s < step]:
                self._futures.pop(s).cancel()
            out = fut.result()
            for s in range(step + 1, step + 1 + self.prefetch):
                if s not in self._futures and self._can_prefetch(s):
                    self._futures[s] = self._pool.submit(self.draw, s)
        self.wait_s += time.perf_counter() - t0
        self.last_step = step
        return out

    def _can_prefetch(self, step: int) -> bool:
        lo, hi = self.window(step)
        return hi <= lo or self._submitted is None or self._submitted(hi - 1)

    def close(self) -> None:
        """Stop prefetching (pending reads are cancelled or finish)."""
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The draw is a pure function of these and the log, so this resumes exactly."""
        return {"seed": self.seed, "rank": self.rank, "num": self.num,
                "window_steps": self.window_steps, "lag_steps": self.lag,
                "recency_half_life": self.half_life, "last_step": self.last_step}

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError if `state` was saved by a sampler configured otherwise."""
        mine = self.state_dict()
        for k in ("seed", "rank", "num", "window_steps", "lag_steps", "recency_half_life"):
            if state[k] != mine[k]:
                raise ValueError(f"sampler state has {k}={state[k]!r}, this sampler "
                                 f"{mine[k]!r}; resume with the run's original config")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.last_step = state["last_step"]
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()


def replay_sampler(reader: RankStoreReader, store: ZarrStoreConfig, *, window_steps: int | None,
                   replay_size: int, seed: int, rank: int,
                   tail: Callable[[int], Uncommitted] | None = None,
                   submitted: Callable[[int], bool] | None = None) -> StreamingSampler:
    """The replay sampler the configuration describes (`mistake_log.window_steps` as
    `window_steps`, None for 'all'; `mistake_log.replay_size`; `mistake_log.store.*`). The joint
    run's log (`ZarrMistakeLog`, with the live writer's `tail`/`submitted`) and offline training
    (a finished log, both None) build theirs here, so they draw the same stream."""
    return StreamingSampler(reader, seed=seed, rank=rank, num=replay_size,
                            window_steps=window_steps, lag_steps=store.replay_lag_steps,
                            recency_half_life=store.recency_half_life, prefetch=store.prefetch,
                            tail=tail, submitted=submitted)
