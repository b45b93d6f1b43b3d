"""MLflow tracking: one run per job, owned by global rank 0; never fatal, never blocking.

- Rank 0 creates the run (or re-attaches to the checkpoint's / `MLFLOW_RUN_ID`'s run on resume)
  and broadcasts its id, so every rank can record it in the checkpoint.
- Params are the flattened resolved config, logged once. On re-attach, values that differ from
  the logged params are set as tags `changed_on_resume.<key>` (MLflow params are immutable).
- Every call after start-up goes through a background thread with a bounded queue, so a slow or
  unreachable tracking server costs the training loop nothing. A failure prints one warning per
  outage; later updates are tried again (the server may come back). `close()` waits at most
  `tracking.close_timeout_s` for the queue to drain.
- On re-attach, each metric's steps already logged are not logged again: a resumed run replays
  the steps after its checkpoint, and exact resume makes their values the same. The first
  value of a (metric, step) stands.
- A run ends FINISHED, FAILED (the error as the tag `tcp.error`) or KILLED (stopped by a signal
  or by its launcher's exit, after a clean checkpoint): `close(status)`.
- Environment (MLflow's own conventions) wins over the config: MLFLOW_TRACKING_URI,
  MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID, and MLFLOW_TAGS (a JSON object, or `k=v,k=v`).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tcp.config import RunConfig, to_dict
from tcp.runtime.console import logger

_PARAM_MAX = 500  # characters of a param value (MLflow stores at most 6000; configs are short)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_tags(text: str | None) -> dict[str, str]:
    """MLFLOW_TAGS: a JSON object, or comma-separated k=v pairs."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            return {str(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError):
            pass
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"MLFLOW_TAGS: cannot parse {part!r}; use a JSON object or k=v,k=v")
        out[k.strip()] = v.strip()
    return out


def tracking_uri(cfg: RunConfig) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else sqlite `mlflow.db` beside the run folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.output_dir).resolve().parent / 'mlflow.db'}"


def _warn(msg: str) -> None:
    logger.warning(f"[tcp] warning: {msg}")


class Tracker:
    """The job's MLflow run. Construct on every rank (collective when distributed): rank 0
    starts or re-attaches, the others learn `run_id`. Off rank 0 every method is a no-op."""

    def __init__(self, cfg: RunConfig, *, rank: int, run_id: str | None = None) -> None:
        self.cfg, self.rank = cfg, rank
        self.active = False
        self.run_id: str | None = None
        self.dropped = 0
        self.logged_through: dict[str, int] = {}
        """On re-attach: per metric, the last step the run already holds."""
        self._failing = False
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        if rank == 0 and cfg.tracking.enabled:
            try:
                self._start(run_id)
            except Exception as e:  # tracking must never take training down
                _warn(f"MLflow tracking disabled: could not start a run at "
                      f"{tracking_uri(cfg)} ({type(e).__name__}: {e})")
                self.active = False
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [self.run_id]
            dist.broadcast_object_list(box, src=0)
            self.run_id = box[0]

    # -------------------------------------------------------------- start
    def _start(self, run_id: str | None) -> None:
        # Bound MLflow's HTTP retries (default: 7 with exponential backoff, minutes when the
        # server is down); users who set these keep their values.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient  # heavy: only when tracking is on

        cfg = self.cfg
        self.uri = tracking_uri(cfg)
        client = MlflowClient(tracking_uri=self.uri)
        params = {k: str(v)[:_PARAM_MAX] for k, v in flatten(to_dict(cfg)).items()}
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        tags = parse_tags(os.environ.get("MLFLOW_TAGS"))
        if run_id:
            run = client.get_run(run_id)  # raises if it does not exist
            old = run.data.params
            changed = {k: v for k, v in params.items() if k in old and old[k] != v}
            new = {k: v for k, v in params.items() if k not in old}
            tags.update({f"changed_on_resume.{k}": v for k, v in changed.items()})
            tags["tcp.resumes"] = str(int(run.data.tags.get("tcp.resumes", "0")) + 1)
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            for key in run.data.metrics:
                steps = [m.step for m in client.get_metric_history(run_id, key)]
                self.logged_through[key] = max(steps, default=-1)
            params = new
        else:
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.tracking.experiment
            exp = client.get_experiment_by_name(exp_name)
            if exp is None:
                art = None
                if self.uri.startswith("sqlite:"):  # artifacts beside the database, not ./mlruns
                    db = Path(self.uri.removeprefix("sqlite:///"))
                    art = (db.parent / "mlartifacts").resolve().as_uri()
                exp_id = client.create_experiment(exp_name, artifact_location=art)
            else:
                exp_id = exp.experiment_id
            name = cfg.tracking.run_name or Path(cfg.output_dir).name
            run_id = client.create_run(exp_id, run_name=name).info.run_id
        from mlflow.entities import Param, RunTag  # heavy: only when tracking is on

        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._client, self.run_id, self.active = client, run_id, True
        self._thread = threading.Thread(target=self._work, name="tcp-mlflow", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- worker
    def _submit(self, fn: Callable[[], None]) -> None:
        if not self.active:
            return
        try:
            self._q.put_nowait(fn)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            fn = self._q.get()
            try:
                if fn is None:
                    return
                fn()
                if self._failing:
                    _warn("MLflow tracking works again")
                    self._failing = False
            except Exception as e:
                self.dropped += 1
                if not self._failing:
                    _warn(f"MLflow tracking failed ({type(e).__name__}: {str(e)[:300]}); "
                          "training goes on, later updates will be tried")
                    self._failing = True
            finally:
                self._q.task_done()

    # -------------------------------------------------------------- API
    def metrics(self, values: dict[str, float], *, step: int) -> None:
        """Log metrics at `step` (asynchronously); on a re-attached run, not at a step the run
        already holds for that metric."""
        if not self.active:
            return
        from mlflow.entities import Metric  # heavy: only when tracking is on

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in values.items()
              if step > self.logged_through.get(k, -1)]
        if not ms:
            return
        run_id = self.run_id
        self._submit(lambda: self._client.log_batch(run_id, metrics=ms))

    def tags(self, values: dict[str, str]) -> None:
        """Set run tags (asynchronously)."""
        if not self.active or not values:
            return
        from mlflow.entities import RunTag  # heavy: only when tracking is on

        ts = [RunTag(k, str(v)) for k, v in values.items()]
        run_id = self.run_id
        self._submit(lambda: self._client.log_batch(run_id, tags=ts))

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file (asynchronously)."""
        run_id = self.run_id
        self._submit(lambda: self._client.log_artifact(run_id, str(path), artifact_path))

    def close(self, status: str = "FINISHED", *, error: BaseException | None = None) -> None:
        """Mark the run `status` (FINISHED, FAILED, KILLED), with `error` as the tag
        `tcp.error`, and wait (bounded) for queued updates. Idempotent."""
        if not self.active:
            return
        if error is not None:
            self.tags({"tcp.error": f"{type(error).__name__}: {error}"[:1000]})
        run_id = self.run_id
        self._submit(lambda: self._client.set_terminated(run_id, status=status))
        self._q.put(None)
        assert self._thread is not None
        self._thread.join(timeout=self.cfg.tracking.close_timeout_s)
        if self._thread.is_alive():
            _warn(f"MLflow: gave up waiting for {self._q.qsize()} queued updates after "
                  f"{self.cfg.tracking.close_timeout_s:.0f}s (tracking.close_timeout_s)")
        elif self.dropped:
            _warn(f"MLflow: {self.dropped} updates could not be logged")
        self.active = False
