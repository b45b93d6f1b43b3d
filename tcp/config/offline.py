"""`offline`: training a fresh Copilot from a finished run's recorded Mistake Log, with no
Pilot forward or backward (`tcp-train --offline-from <run>`; tcp/training/offline_job.py,
docs/method.md)."""

from __future__ import annotations

from dataclasses import dataclass

from tcp.config.schema import _check


@dataclass
class OfflineConfig:
    """Offline Copilot training. Unset (`source: null`) in a joint run."""

    source: str | None = None
    """The finished run whose Mistake Log trains the Copilot and whose final Pilot evaluates it
    (set by `--offline-from`); null: joint training. Recorded in the offline run's
    config.yaml, so `tcp-eval <offline run>` finds that Pilot."""
    log_path: str | None = None
    """The Mistake Log to read; null: the source run's own (its mistake_log.store.path, else
    `<source>/mistake_log`). Point it at a copy, e.g. one merged into a single shard with
    `tcp-log compact <copy> --merge-ranks` for a 1-rank offline job."""

    seed: int | None = None
    """Seeds the offline Copilot's initialisation and replay draws; null: the run's `seed`,
    i.e. the source's, so a Copilot of the source's shape sees the joint run's exact stream.
    (`seed` itself stays the source's: it also generates the embedded task's data.)"""

    def __post_init__(self) -> None:
        _check(self.log_path is None or self.source is not None, "log_path",
               "needs offline.source (use --offline-from <finished run>)")
