"""The `MistakeLog` interface every backend implements: memory.py (RAM window), disk.py (Zarr).

Sampling decisions are pure functions of (seed, step, rank): a resumed run draws the same entries.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from tcp.mistake_log.record import MistakeBatch


def sample_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The RNG that decides what rank `rank` replays at `step`."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


class MistakeLog(abc.ABC):
    """Append entries as the Pilot trains; sample replay batches for the Copilot."""

    @abc.abstractmethod
    def append(self, batch: MistakeBatch) -> None:
        """Add the entries of one Pilot step (all entries share `batch.step`)."""

    @abc.abstractmethod
    def sample(self, *, step: int, num: int) -> MistakeBatch | None:
        """`num` entries drawn uniformly from steps [step - window, step) (the replay window,
        excluding the current step, whose entries the trainer holds in memory). None if empty."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Entries currently retained."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume sampling exactly."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict`."""

    def check_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional
        """Raise (ValueError, or the log's own error) if `load_state_dict(state)` would fail,
        without changing anything: a resume checks everything before it changes anything."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends need it
        """Flush and release resources. Idempotent."""

    def metrics(self) -> dict[str, float]:
        """Backend counters worth tracking (bytes, queue depth, waits); empty by default."""
        return {}
