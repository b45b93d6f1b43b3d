"""tcp.evaluation.stats: the exact McNemar test and the bootstrap interval against hand-computed
values."""

import random

import pytest

from tcp.evaluation.stats import (
    bootstrap_diff_ci,
    discordant,
    format_paired,
    mcnemar_exact,
    paired_comparison,
)


@pytest.mark.parametrize("b,c,p", [
    (0, 5, 0.0625),  # 2 * (1/2)^5
    (5, 0, 0.0625),
    (0, 0, 1.0),  # no discordant pair: nothing to test
    (4, 4, 1.0),  # b = c: the tail is over half, capped at 1
    (1, 0, 1.0),  # 2 * 1/2
    (1, 4, 0.375),  # 2 * (1 + 5) / 32
    (2, 9, 0.0654296875),  # 2 * (1 + 11 + 55) / 2048
    (0, 10, 2 / 1024),
    (12, 21, 0.16275565745308995),  # 2 * sum_{k<=12} C(33, k) / 2^33
])
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_finite_and_symmetric():
    p = mcnemar_exact(5000, 5300)  # 2^10300 overflows a float: the sum stays in integers
    assert 0 < p < 0.01 and p == mcnemar_exact(5300, 5000)
    assert mcnemar_exact(3000, 3000) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_discordant_counts_and_length_check():
    assert discordant([1, 1, 0, 0, 1], [1, 0, 1, 1, 0]) == (2, 2)
    assert discordant([True, False], [True, True]) == (0, 1)
    with pytest.raises(ValueError, match="differ in length"):
        discordant([True], [True, False])


def test_bootstrap_is_seeded_and_contains_the_observed_difference():
    b, c, n = 12, 21, 200
    ci = bootstrap_diff_ci(b, c, n, resamples=4000, seed=3)
    assert ci == bootstrap_diff_ci(b, c, n, resamples=4000, seed=3)
    assert ci != bootstrap_diff_ci(b, c, n, resamples=4000, seed=4)
    lo, hi = ci
    assert lo < (c - b) / n < hi
    # the normal approximation's width 2 * 1.96 * sqrt((b + c) - (c - b)^2 / n) / n ≈ 0.112
    assert hi - lo == pytest.approx(0.112, abs=0.012)
    assert bootstrap_diff_ci(0, 0, 50) == (0.0, 0.0) and bootstrap_diff_ci(0, 0, 0) == (0.0, 0.0)


def test_bootstrap_by_counts_matches_resampling_examples():
    """The multinomial shortcut has the distribution of resampling the examples one by one."""
    pilot = [True] * 30 + [False] * 10 + [True] * 5 + [False] * 55
    fused = [True] * 30 + [True] * 10 + [False] * 5 + [False] * 55
    rng = random.Random(0)
    diffs = []
    for _ in range(4000):
        idx = [rng.randrange(100) for _ in range(100)]
        diffs.append(sum(fused[i] - pilot[i] for i in idx) / 100)
    diffs.sort()
    naive = (diffs[int(0.025 * 4000)], diffs[int(0.975 * 4000)])
    lo, hi = bootstrap_diff_ci(5, 10, 100, resamples=4000, seed=1)
    assert lo == pytest.approx(naive[0], abs=0.015) and hi == pytest.approx(naive[1], abs=0.015)


def test_paired_comparison_and_its_line():
    pilot = [True, True, False, False, True, False, False, False]
    fused = [True, False, True, True, True, True, True, False]
    p = paired_comparison(pilot, fused, resamples=2000, seed=0)
    d = p.to_dict()
    assert (d["n"], d["pilot_correct"], d["copilot_correct"], d["b"], d["c"]) == (8, 3, 6, 1, 4)
    assert d["mcnemar_p"] == 0.375 and d["diff"] == 3 / 8
    assert d["bootstrap"]["resamples"] == 2000 and d["bootstrap"]["seed"] == 0
    lo, hi = d["diff_ci95"]
    assert lo <= 3 / 8 <= hi
    line = format_paired(d)
    assert line.startswith("+37.5 points [") and "McNemar p = 0.375" in line
    assert "(b=1 only the Pilot right, c=4 only Pilot+Copilot right; n=8)" in line
    same = paired_comparison(pilot, pilot).to_dict()
    assert (same["b"], same["c"], same["mcnemar_p"], same["diff"], same["diff_ci95"]) == \
        (0, 0, 1.0, 0.0, [0.0, 0.0])
