"""Training metrics at each logging interval, for the joint and the offline loop (both reduce
their window through tcp.runtime.collective.sum_across_ranks): the Copilot's RMSE against the
zero baseline, and the history kept for results.json."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    """Averaged metrics at each logging interval (all ranks), kept for results.json."""

    rows: list[dict[str, float]] = field(default_factory=list)


def copilot_metrics(copilot_rmse_sum: float, zero_rmse_sum: float,
                    world: int) -> dict[str, float]:
    """The Copilot's RMSE and the zero baseline's (predicting no error), each the mean of the
    ranks' window means (`sum_across_ranks`), and their ratio (< 1: the Copilot learned)."""
    copilot_rmse, zero_rmse = copilot_rmse_sum / world, zero_rmse_sum / world
    return {"copilot_rmse": copilot_rmse, "zero_rmse": zero_rmse,
            "rmse_ratio": copilot_rmse / max(zero_rmse, 1e-12)}
