"""Paired comparison of two systems scored on the same examples: Pilot vs Pilot+Copilot.

Two numbers answer "is the Copilot's gain real or noise?" without assuming anything beyond the
per-example correct flags:

- the exact McNemar test: only the discordant examples carry information, b (the Pilot right,
  Pilot+Copilot wrong) and c (the Pilot wrong, Pilot+Copilot right). Under "no difference" each
  discordant example is a fair coin, so with X ~ Bin(b + c, 1/2) the two-sided p-value is
  min(1, 2 P[X <= min(b, c)]), and 1 when b + c = 0. Computed in exact integer arithmetic.
- a percentile bootstrap 95% interval of the accuracy difference (Pilot+Copilot - Pilot):
  examples resampled with replacement, seeded. A resample's difference depends only on how
  many b- and c-examples it drew, so the resample is drawn as multinomial counts over
  (b, c, concordant): the same distribution as resampling the n examples one by one, at a cost
  independent of n.

No scipy: it is not a dependency of tcp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
"""Fixed, so the interval is a function of the flags alone: rerunning the summary (or
tools/summarize_runs.py on the run's predictions.jsonl) reproduces it exactly."""


@dataclass
class Paired:
    """The paired comparison as written to results.json["paired"] (`to_dict`)."""

    n: int
    pilot_correct: int
    copilot_correct: int
    """Pilot+Copilot's correct answers."""
    b: int
    """The Pilot right, Pilot+Copilot wrong (answers the Copilot broke)."""
    c: int
    """The Pilot wrong, Pilot+Copilot right (answers the Copilot fixed)."""
    mcnemar_p: float
    diff: float
    """Pilot+Copilot accuracy minus the Pilot's, as a fraction (c - b) / n."""
    diff_ci95: list[float]
    resamples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the bootstrap settings grouped under "bootstrap"."""
        d = asdict(self)
        d["bootstrap"] = {"resamples": d.pop("resamples"), "seed": d.pop("seed"),
                          "method": "percentile, examples resampled with replacement"}
        d["test"] = "exact McNemar (two-sided binomial on b, c)"
        return d


def discordant(pilot: Sequence[bool], copilot: Sequence[bool]) -> tuple[int, int]:
    """(b, c): examples only the Pilot got right, and only Pilot+Copilot got right."""
    if len(pilot) != len(copilot):
        raise ValueError(f"paired flags differ in length: {len(pilot)} vs {len(copilot)}")
    b = sum(1 for p, q in zip(pilot, copilot, strict=True) if p and not q)
    c = sum(1 for p, q in zip(pilot, copilot, strict=True) if q and not p)
    return b, c


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: min(1, 2 P[X <= min(b, c)]), X ~ Bin(b + c, 1/2)."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0 (got b={b}, c={c})")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0); exact integers, so no underflow in the sum
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / 2**n)


def bootstrap_diff_ci(b: int, c: int, n: int, *, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of (c - b) / n over `resamples` resamples of the n
    examples (as multinomial counts: see the module docstring). (0, 0) when n = 0."""
    if n == 0 or b + c == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b / n, c / n, (n - b - c) / n], size=resamples)
    diffs = (counts[:, 1] - counts[:, 0]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_comparison(pilot: Sequence[bool], copilot: Sequence[bool], *,
                      resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> Paired:
    """McNemar and the bootstrap interval for per-example correct flags, aligned by example."""
    b, c = discordant(pilot, copilot)
    n = len(pilot)
    lo, hi = bootstrap_diff_ci(b, c, n, resamples=resamples, seed=seed)
    return Paired(n=n, pilot_correct=sum(map(bool, pilot)),
                  copilot_correct=sum(map(bool, copilot)), b=b, c=c,
                  mcnemar_p=mcnemar_exact(b, c), diff=(c - b) / n if n else 0.0,
                  diff_ci95=[lo, hi], resamples=resamples, seed=seed)


def format_paired(p: Mapping[str, Any]) -> str:
    """One line: the difference in points with its interval, McNemar's p and b, c."""
    lo, hi = p["diff_ci95"]
    return (f"{100 * p['diff']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] 95% bootstrap "
            f"CI, exact McNemar p = {p['mcnemar_p']:.3g} (b={p['b']} only the Pilot right, "
            f"c={p['c']} only Pilot+Copilot right; n={p['n']})")
