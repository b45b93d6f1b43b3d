"""`train` (the joint loop; its two engines are in engine.py), `checkpoint`, `tracking` and
`kernels`: what runs alongside the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcp.config.engine import EngineConfig
from tcp.config.schema import _check


@dataclass
class TrainConfig:
    """The joint loop (docs/method.md §5)."""

    steps: int = 500
    """Joint steps (one Pilot step and one Copilot step each). Ignored when `epochs` is set."""
    epochs: float | None = None
    """If set, train this many passes over the training set instead of `steps`: the run
    computes steps = ceil(epochs * train samples / (pilot micro_batch_size * world size)) once
    the data is loaded, prints it and records it in the resolved config (schedules follow)."""
    log_every: int = 10
    """Progress/metric interval in steps."""
    pilot: EngineConfig = field(default_factory=lambda: EngineConfig(lr=3e-4))
    """The Pilot's engine."""
    copilot: EngineConfig = field(default_factory=lambda: EngineConfig(lr=1e-3))
    """The Copilot's engine."""
    copilot_start_step: int = 0
    """Joint step at which Copilot updates begin (entries are logged from step 0)."""
    copilot_tail_steps: int = 0
    """Copilot-only steps after the joint ones. The Pilot is final and no longer updated, but
    keeps running forward on the next training batches and logging its errors; the Copilot
    goes on training on them (current + replay, as in the joint steps). Errors that stop
    moving are easier to learn than those of a Pilot that is still being fine-tuned
    (docs/method.md, "Copilot tail"). The Copilot's schedule spans steps + tail."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for the other ranks before it fails with an error (so a
    rank that died takes the job down instead of leaving the others waiting forever)."""

    def __post_init__(self) -> None:
        _check(self.steps > 0, "steps", f"must be > 0 (got {self.steps})")
        _check(self.epochs is None or self.epochs > 0, "epochs",
               f"must be > 0 or null (got {self.epochs}); null trains for train.steps")
        _check(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0 seconds")
        _check(self.log_every > 0, "log_every", "must be > 0")
        _check(self.copilot_start_step >= 0, "copilot_start_step", "must be >= 0")
        _check(self.copilot_tail_steps >= 0, "copilot_tail_steps",
               f"must be >= 0 (got {self.copilot_tail_steps}); 0: joint steps only")

    @property
    def total_steps(self) -> int:
        """Every step of the loop: the joint ones, then the Copilot-only tail."""
        return self.steps + self.copilot_tail_steps



@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only; a tracking failure never stops training)."""

    enabled: bool = True
    """Log params, metrics and results to MLflow."""
    uri: str | None = None
    """Tracking URI; None = sqlite database `mlflow.db` in the parent of output_dir.
    MLFLOW_TRACKING_URI in the environment wins."""
    experiment: str = "tcp"
    """MLflow experiment name (MLFLOW_EXPERIMENT_NAME wins)."""
    run_name: str | None = None
    """MLflow run name; None uses the output directory's name."""
    close_timeout_s: float = 30.0
    """At the end, wait at most this long for queued updates to reach the tracking server."""

    def __post_init__(self) -> None:
        _check(self.close_timeout_s >= 0, "close_timeout_s", "must be >= 0")


@dataclass
class CheckpointConfig:
    """Composite checkpoints: both engines, every rank's trainer state, a manifest written last."""

    every: int = 500
    """Save every this many joint steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    dir: str | None = None
    """Where checkpoints go; None: `<output_dir>/checkpoints`. Must be visible to every rank
    (a shared filesystem on multi-node runs)."""
    on_signal: bool = True
    """On SIGTERM/SIGINT: finish the current step, flush the Mistake Log, save, exit 143/130."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "every", f"must be >= 0 (got {self.every}); 0 saves only at "
               "the end and on SIGTERM/SIGINT")
        _check(self.keep_last >= 1, "keep_last", f"must be >= 1 (got {self.keep_last})")


@dataclass
class KernelsConfig:
    """The fused kernels of `tcp.kernels` (pooling, Pilot loss, Copilot loss)."""

    fused: bool = True
    """Fused Pilot cross-entropy (LM head + loss + top-k, no (N, V) logits) and fused Copilot
    RMSE (head + loss, no (N, V) f). false: the eager paths (full logits / f), for comparison."""
    impl: Literal["auto", "torch", "triton"] = "auto"
    """Backend: 'auto' = Triton on CUDA tensors, the torch reference on CPU; 'torch'; 'triton'
    (CUDA, or CPU under TRITON_INTERPRET=1). TCP_KERNELS in the environment wins."""
    chunk_mib: float = 64.0
    """Size of the one (tokens, vocabulary) fp32 chunk buffer each fused loss works in."""

    def __post_init__(self) -> None:
        _check(self.chunk_mib > 0, "chunk_mib", f"must be > 0 MiB (got {self.chunk_mib})")
