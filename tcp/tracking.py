"""MLflow tracking from rank 0 only; a tracking failure is reported once and never fatal."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from tcp.config import RunConfig, to_dict


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin MLflow wrapper; a no-op off rank 0 or when disabled or broken."""

    def __init__(self, cfg: RunConfig, *, rank: int) -> None:
        self.active = cfg.tracking.enabled and rank == 0
        self._mlflow: Any = None
        if not self.active:
            return
        try:
            import mlflow

            out = Path(cfg.output_dir).resolve()
            uri = cfg.tracking.uri or f"sqlite:///{out.parent / 'mlflow.db'}"
            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
                # Artifacts beside the database, not in ./mlruns of whatever the cwd is.
                mlflow.create_experiment(cfg.tracking.experiment,
                                         artifact_location=(out.parent / "mlartifacts").as_uri())
            mlflow.set_experiment(cfg.tracking.experiment)
            mlflow.start_run(run_name=cfg.tracking.run_name or out.name)
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(to_dict(cfg)).items()})
            self._mlflow = mlflow
            self.uri = uri
        except Exception as e:  # tracking must never take training down
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        warnings.warn(f"MLflow tracking disabled after an error: {type(e).__name__}: {e}",
                      stacklevel=3)
        self.active = False

    def metrics(self, values: dict[str, float], *, step: int) -> None:
        """Log metrics at `step`."""
        if self.active:
            try:
                self._mlflow.log_metrics(values, step=step)
            except Exception as e:
                self._fail(e)

    def artifact(self, path: Path) -> None:
        """Log a file."""
        if self.active:
            try:
                self._mlflow.log_artifact(str(path))
            except Exception as e:
                self._fail(e)

    def close(self, status: str = "FINISHED") -> None:
        """End the run."""
        if self.active:
            try:
                self._mlflow.end_run(status=status)
            except Exception as e:
                self._fail(e)
            self.active = False
