"""Choosing λ on validation: λ 0 ("Copilot off") is always a candidate; a λ > 0 is one only if it
beats the Pilot beyond validation noise (eval.lambda_significance)."""

from __future__ import annotations

from tcp.evaluation.generation_eval import GenResult
from tcp.evaluation.stats import mcnemar_exact


def _most_accurate(val: GenResult, indices: list[int]) -> tuple[float, float]:
    """(lambda, accuracy) of the most accurate of `indices` (ties: the smaller lambda, the
    smaller correction that does as well)."""
    best = max(indices, key=lambda i: (val.accuracy[i], -val.lambdas[i]))
    return val.lambdas[best], val.accuracy[best]


def best_positive_lambda(val: GenResult) -> tuple[float, float] | None:
    """The most accurate lambda > 0 on validation (ties: the smaller), with its accuracy; None
    when only the Pilot (index 0) was decoded."""
    if len(val.lambdas) < 2:
        return None
    return _most_accurate(val, list(range(1, len(val.lambdas))))


def lambda_p_value(val: GenResult, i: int) -> float | None:
    """Exact McNemar p of lambda `i` against the Pilot alone on `val` (its fixes and breaks);
    None when they were not counted."""
    if i >= len(val.fixes) or i >= len(val.breaks):
        return None
    return mcnemar_exact(val.breaks[i], val.fixes[i])


def choose_lambda(val: GenResult, significance: float | None = None) -> tuple[float, float]:
    """The lambda to test with, chosen on validation; index 0 is the Pilot alone (lambda 0).

    lambda 0 ("Copilot off") is a candidate: it is chosen unless some lambda > 0 is strictly
    more accurate than the Pilot. With `significance` (eval.lambda_significance) a lambda > 0
    must also beat the Pilot beyond validation noise to be a candidate: its exact McNemar p
    (the answers it fixed against those it broke) below `significance` divided by the number of
    lambdas > 0 tried (Bonferroni: were the Copilot useless, the chance that any lambda passes
    stays below `significance`). The most accurate candidate wins; ties go to the smaller
    lambda, the smaller correction that does as well. Returns (lambda, its validation accuracy).
    """
    tried = len(val.lambdas) - 1
    ok = [i for i in range(1, len(val.lambdas)) if val.accuracy[i] > val.accuracy[0]]
    if significance is not None:
        ok = [i for i in ok if (p := lambda_p_value(val, i)) is not None
              and p < significance / tried]
    if not ok:
        return 0.0, val.accuracy[0]
    return _most_accurate(val, ok)
