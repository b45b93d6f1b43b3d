"""Prune policies: pure functions from a log's per-entry facts to keep-masks.

Policies combine: an entry is kept only if every given policy keeps it. `max_bytes` is decided
last, on what the others keep: it drops the oldest remaining steps (all ranks together) until
the estimated stored size of the rest fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tcp.log_tools.errors import UsageError, human_bytes
from tcp.log_tools.tables import LogTables, ShardTable


@dataclass(frozen=True)
class PrunePolicy:
    """Which entries a prune keeps (None = that policy is not used)."""

    keep_last_steps: int | None = None
    """Keep steps > last_step - N (last_step over all ranks)."""
    before_step: int | None = None
    """Drop entries with step < S."""
    min_loss: float | None = None
    """Keep entries whose Pilot loss is > X."""
    only_mistakes: bool = False
    """Keep entries with at least one target token whose stored top-1 is not the label."""
    max_bytes: int | None = None
    """Drop the oldest steps until the estimated stored size is <= B."""

    def __post_init__(self) -> None:
        if self.keep_last_steps is not None and self.keep_last_steps < 1:
            raise UsageError(f"--keep-last-steps {self.keep_last_steps}: must be >= 1")
        if self.min_loss is not None and self.only_mistakes:
            raise UsageError("--min-loss and --only-mistakes: give one of them")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise UsageError(f"--max-bytes {self.max_bytes}: must be >= 0")
        if not self.describe():
            raise UsageError("prune needs a policy: --keep-last-steps, --before-step, "
                             "--min-loss, --only-mistakes and/or --max-bytes")

    def describe(self) -> dict[str, Any]:
        """The policies in use, for reports and the log's history."""
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}


def keep_masks(tables: LogTables, policy: PrunePolicy) -> list[np.ndarray]:
    """(B_r,) bool per shard, in `tables.shards` order: True = the entry is kept."""
    masks = [_entry_policies(s, policy, tables.last_step) for s in tables.shards]
    if policy.max_bytes is not None:
        cut = oldest_step_to_keep(tables.shards, masks, policy.max_bytes)
        masks = [m & (s.step >= cut) for s, m in zip(tables.shards, masks, strict=True)]
    return masks


def _entry_policies(s: ShardTable, p: PrunePolicy, last_step: int | None) -> np.ndarray:
    keep = np.ones(s.step.size, dtype=bool)
    if p.keep_last_steps is not None and last_step is not None:
        keep &= s.step > last_step - p.keep_last_steps
    if p.before_step is not None:
        keep &= s.step >= p.before_step
    if p.min_loss is not None:
        keep &= s.loss > p.min_loss
    if p.only_mistakes:
        if s.mistakes is None:
            raise ValueError("only_mistakes needs tables loaded with mistakes=True")
        keep &= s.mistakes > 0
    return keep


def oldest_step_to_keep(shards: list[ShardTable], masks: list[np.ndarray],
                        budget: float) -> float:
    """The smallest step S such that the kept entries with step >= S fit in `budget` estimated
    stored bytes (inf when not even the newest step fits)."""
    steps = np.concatenate([s.step[m] for s, m in zip(shards, masks, strict=True)])
    est = np.concatenate([s.raw[m] * s.ratio for s, m in zip(shards, masks, strict=True)])
    if steps.size == 0:
        return -np.inf
    uniq, inv = np.unique(steps, return_inverse=True)
    per_step = np.bincount(inv, weights=est)
    newest_first = np.cumsum(per_step[::-1])  # bytes of the newest j+1 steps
    fits = int(np.searchsorted(newest_first, budget, side="right"))  # steps that fit
    if fits == 0:
        return np.inf
    return float(uniq[uniq.size - fits])


@dataclass
class ShardPlan:
    """What a prune does to one shard."""

    rank: int
    kept: int
    dropped: int
    kept_steps: tuple[int, int] | None
    dropped_steps: tuple[int, int] | None
    kept_bytes: float
    dropped_bytes: float


def plan(tables: LogTables, masks: list[np.ndarray]) -> list[ShardPlan]:
    """Counts, step ranges and estimated stored bytes kept and dropped, per shard."""
    out = []
    for s, m in zip(tables.shards, masks, strict=True):
        def span(sel: np.ndarray, s: ShardTable = s) -> tuple[int, int] | None:
            st = s.step[sel]
            return (int(st.min()), int(st.max())) if st.size else None

        out.append(ShardPlan(s.rank, int(m.sum()), int((~m).sum()), span(m), span(~m),
                             s.estimated(m), s.estimated(~m)))
    return out


def report(plans: list[ShardPlan]) -> list[str]:
    """Lines: per rank and in total, what goes and what remains."""
    def steps(r: tuple[int, int] | None) -> str:
        return "no steps" if r is None else f"steps {r[0]}..{r[1]}"

    lines = []
    for p in plans:
        lines.append(f"  rank {p.rank}: keep {p.kept} entries ({steps(p.kept_steps)}, "
                     f"~{human_bytes(p.kept_bytes)}), drop {p.dropped} entries "
                     f"({steps(p.dropped_steps)}, ~{human_bytes(p.dropped_bytes)})")
    kept, dropped = sum(p.kept for p in plans), sum(p.dropped for p in plans)
    kb, db = sum(p.kept_bytes for p in plans), sum(p.dropped_bytes for p in plans)
    lines.append(f"  total: keep {kept} of {kept + dropped} entries (~{human_bytes(kb)}), "
                 f"drop {dropped} (~{human_bytes(db)})")
    return lines
