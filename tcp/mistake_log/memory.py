"""In-memory Mistake Log: the paper's buffer of the most recent `window_steps` steps."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from tcp.mistake_log.base import MistakeLog, sample_generator
from tcp.mistake_log.record import MistakeBatch


class MemoryMistakeLog(MistakeLog):
    """Keeps each step's entries (on CPU) while the step is inside the window."""

    def __init__(self, *, window_steps: int, seed: int, rank: int) -> None:
        self.window_steps = window_steps
        self.seed = seed
        self.rank = rank
        self._steps: OrderedDict[int, MistakeBatch] = OrderedDict()

    def append(self, batch: MistakeBatch) -> None:
        steps = batch.step.unique()
        if steps.numel() != 1:
            raise ValueError(f"append() takes one step's entries, got steps {steps.tolist()}")
        s = int(steps)
        if self._steps and s <= next(reversed(self._steps)):
            raise ValueError(f"steps must increase: got {s} after {next(reversed(self._steps))}")
        self._steps[s] = batch.to("cpu")
        # The trainer appends step s, then samples at s from [s - W, s): keep s - W.
        while self._steps and next(iter(self._steps)) < s - self.window_steps:
            self._steps.popitem(last=False)

    def _window(self, step: int) -> list[MistakeBatch]:
        return [b for s, b in self._steps.items() if step - self.window_steps <= s < step]

    def sample(self, *, step: int, num: int) -> MistakeBatch | None:
        pool = self._window(step)
        if num <= 0 or not pool:
            return None
        sizes = torch.tensor([b.num_entries for b in pool])
        total = int(sizes.sum())
        g = sample_generator(self.seed, step, self.rank)
        flat = torch.randint(total, (num,), generator=g) if num > total else \
            torch.randperm(total, generator=g)[:num]
        starts = torch.cumsum(sizes, 0) - sizes
        which = torch.searchsorted(torch.cumsum(sizes, 0), flat, right=True)
        parts = []
        for w in which.unique().tolist():
            sel = flat[which == w] - starts[w]
            parts.append(pool[w].select(sel))
        return MistakeBatch.cat(parts, device="cpu")

    def __len__(self) -> int:
        return sum(b.num_entries for b in self._steps.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_steps": self.window_steps,
            "seed": self.seed,
            "rank": self.rank,
            "steps": {s: b.state_dict() for s, b in self._steps.items()},
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        if "steps" not in state:
            raise ValueError("trainer state holds a zarr Mistake Log; resume with the run's "
                             "original mistake_log.backend")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.window_steps = state["window_steps"]
        self.seed = state["seed"]
        self.rank = state["rank"]
        self._steps = OrderedDict(
            (int(s), MistakeBatch.from_state_dict(b)) for s, b in sorted(state["steps"].items())
        )
