"""The scaffold every training job shares (the joint run, tcp.training.joint_job, and offline
Copilot training, tcp.training.offline_job): start the process group, claim the folders before
anything in them changes, end the MLflow run with the job's status, publish results on rank 0."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tcp.config import RunConfig
from tcp.evaluation.plots import save_plots
from tcp.evaluation.report import format_table, summary_metrics
from tcp.runtime.console import elapsed, logger, setup_logging
from tcp.runtime.process_group import init_distributed
from tcp.runtime.run_folder import RunFolders
from tcp.runtime.tracking import Tracker, flatten
from tcp.training.run_files import write_json


@dataclass(frozen=True)
class JobContext:
    """Where a job runs: this process's rank, the world size, its device, the start time."""

    rank: int
    world: int
    device: torch.device
    t_start: float


def run_job(cfg: RunConfig, *, claim: Callable[[RunConfig, int], RunFolders],
            body: Callable[[RunConfig, JobContext], dict[str, Any]]) -> dict[str, Any]:
    """Start the process group, `claim` the job's folders (collective; a folder in use fails on
    every rank before anything changes), run `body`, give the folders back however it ends."""
    t_start = time.time()
    setup_logging()  # rank-0 messages to the console, unless the caller set logging up
    rank, world, device = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    folders = claim(cfg, rank)
    try:
        return body(cfg, JobContext(rank=rank, world=world, device=device, t_start=t_start))
    finally:
        folders.release()


class JobEnd:
    """How a job ended, for MLflow and for the ranks: FAILED unless the job sets `status`
    ("FINISHED", or "KILLED" when a signal stopped it after a clean checkpoint); a second
    Ctrl-C (KeyboardInterrupt, a forced stop, no checkpoint) is KILLED. `record` the error the
    job ends with, then `close` in its `finally`."""

    def __init__(self) -> None:
        self.status = "FAILED"
        self.error: BaseException | None = None

    def record(self, error: BaseException) -> None:
        """The job is ending with `error`."""
        self.error = error
        self.status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"

    def close(self, tracker: Tracker | None) -> None:
        """End the MLflow run with the status; then, when the job ended as it meant to (finished,
        or stopped by a signal after a clean checkpoint), wait for every rank. Never after an
        exception, a forced stop included: the other ranks may be gone."""
        if tracker is not None:
            tracker.close(self.status, error=self.error)
        if self.error is None and self.status != "FAILED" and dist.is_initialized():
            dist.barrier()


def publish_results(results: dict[str, Any], out: Path, tracker: Tracker, *, step: int,
                    t_start: float, metrics: dict[str, float] | None = None) -> None:
    """Rank 0: results.json, `metrics` and the final report to MLflow, the printed table and
    where the results are."""
    write_json(out / "results.json", results)
    if metrics:
        tracker.metrics(metrics, step=step)
    report(results, out, tracker, step=step)
    logger.info(f"[tcp] results: {out / 'results.json'} (total {elapsed(t_start)})")


def report(results: dict[str, Any], out: Path, tracker: Tracker, *, step: int) -> None:
    """Rank 0: the final metrics, results.json and plots to MLflow, and the printed table."""
    if "pilot" in results:
        validation = results["validation"]
        final = summary_metrics(results)  # accuracies, λ, budget, truncated shares
        # docs/method.md §7 diagnostics; fixes/breaks per λ become e.g. val/fixes.lambda_0.5
        final.update({f"val/{k.replace('.', '.lambda_', 1) if '.' in k else k}": float(x)
                      for k, x in flatten(validation["teacher_forced"]).items()
                      if isinstance(x, int | float)})
        tracker.metrics(final, step=step)
        for row in validation["sweep"]:
            tracker.metrics({"val_accuracy_pilot_copilot_by_lambda": row["accuracy"]},
                            step=round(row["lambda"] * 1000))
        print(format_table(results), flush=True)
    tracker.artifact(out / "results.json")
    for png in save_plots(results, out / "plots"):
        tracker.artifact(png, "plots")
