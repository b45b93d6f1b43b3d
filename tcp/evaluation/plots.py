"""Evaluation plots of a finished run (PNG, logged to MLflow): training curves, the λ sweep and
the rectification example (tcp.evaluation.rectification)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write the plots `results` has data for into `folder`; returns their paths."""
    import matplotlib  # heavy: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when plotting

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    hist = results.get("history") or []
    if hist:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        steps = [r["step"] for r in hist]
        # an offline Copilot run (tcp.training.offline_job) has no Pilot loss
        if "pilot_loss" in hist[0]:
            a.plot(steps, [r["pilot_loss"] for r in hist], label="Pilot loss")
            a.set_xlabel("step")
            a.set_ylabel("cross-entropy")
            a.legend()
        else:
            a.set_axis_off()
        cop = [r for r in hist if "copilot_rmse" in r]
        if cop:
            b.plot([r["step"] for r in cop], [r["copilot_rmse"] for r in cop],
                   label="Copilot RMSE")
            b.plot([r["step"] for r in cop], [r["zero_rmse"] for r in cop],
                   label="zero baseline", linestyle="--")
            b.set_xlabel("step")
            b.set_ylabel("RMSE")
            b.legend()
        fig.tight_layout()
        written.append(folder / "training.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    val = results.get("validation")
    if val and val.get("sweep"):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        lams = [s["lambda"] for s in val["sweep"]]
        ax.plot(lams, [s["accuracy"] for s in val["sweep"]], marker="o", label="Pilot+Copilot")
        ax.axhline(val["pilot_accuracy"], color="gray", linestyle="--", label="Pilot")
        ax.set_xlabel("λ")
        ax.set_ylabel("validation accuracy")
        ax.legend()
        fig.tight_layout()
        written.append(folder / "lambda_sweep.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if results.get("rectification"):
        # heavy (transformers): only when there is a trace to plot
        from tcp.evaluation.rectification import plot_rectification

        written.append(plot_rectification(results["rectification"], folder / "rectification.png"))
    return written
