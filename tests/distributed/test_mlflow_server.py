"""Tracking against a real `mlflow server` on loopback, 2 ranks: one run (rank 0's), the
expected params/metrics/artifacts, a resumed job appending to the same run, and training that
finishes when the server goes away mid-run."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = ("base.enabled=false", "copilot.init_from=none", "model.init_from_base=false",
        "data.train_size=400", "data.val_size=16", "data.test_size=16", "train.steps=8",
        "train.log_every=2", "checkpoint.every=4", "eval.lambdas=[1.0]", "eval.batch_size=16",
        "train.pilot.micro_batch_size=8", "mistake_log.replay_size=8",
        "train.pilot.warmup_steps=2", "train.copilot.warmup_steps=2")


@contextlib.contextmanager
def mlflow_server(folder: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.25)
        else:
            pytest.fail("mlflow server did not come up in 60 s")
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_one_run_with_params_metrics_artifacts_and_resume_appends(tmp_path):
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path) as (url, _):
        env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_NAME": "tcp-server-test",
               "MLFLOW_TAGS": '{"team": "ci"}'}
        run = tmp_path / "run"
        p = launch(run, *TINY, env={**env, "TCP_FAULT_INJECT": "kill@step=6"}, check=False)
        assert p.returncode != 0
        launch(run, *TINY, "resume=auto", "checkpoint.keep_last=3", env=env)

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("tcp-server-test")
        runs = client.search_runs(exp.experiment_id)
        assert len(runs) == 1  # rank 0 only, and the resumed job re-attached
        r = runs[0]
        rid = r.info.run_id
        assert r.info.status == "FINISHED" and r.info.run_name == "run"
        params = r.data.params
        assert params["train.steps"] == "8" and params["mistake_log.backend"] == "zarr"
        assert params["checkpoint.keep_last"] == "2"  # logged once; the change is a tag
        tags = r.data.tags
        assert tags["team"] == "ci" and tags["tcp.resumes"] == "1"
        assert tags["changed_on_resume.checkpoint.keep_last"] == "3"
        assert tags["tcp.resumed_at_step"] == "4"
        history = {m.step for m in client.get_metric_history(rid, "pilot_loss")}
        assert history == {2, 4, 6, 8}
        for key in ("copilot_rmse", "zero_rmse", "rmse_ratio", "lr_pilot", "lr_copilot",
                    "tokens_per_s", "mistake_log/raw_bytes", "mistake_log/stored_bytes",
                    "mistake_log/queue_depth", "mistake_log/blocked_s",
                    "test_accuracy_pilot", "test_accuracy_pilot_copilot", "val/rmse_ratio",
                    "val/cosine", "val/fixes.lambda_1.0", "val/breaks.lambda_1.0",
                    "val_accuracy_pilot", "eval_max_new_tokens", "val_truncated_share",
                    "test_truncated_share", "chosen_lambda"):
            assert key in r.data.metrics, key
        arts = {a.path for a in client.list_artifacts(rid)}
        assert {"results.json", "config.yaml", "deepspeed.json", "plots"} <= arts
        assert {a.path for a in client.list_artifacts(rid, "plots")} == \
            {"plots/training.png", "plots/lambda_sweep.png", "plots/rectification.png"}


@pytest.mark.extended
def test_training_finishes_when_the_server_stops_mid_run(tmp_path):
    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path) as (url, server):
        run = tmp_path / "run"
        job = launch(run, *TINY, "train.steps=60", "checkpoint.every=0", "eval.enabled=false",
                     "tracking.close_timeout_s=5", env={"MLFLOW_TRACKING_URI": url},
                     popen=True)
        client = MlflowClient(url)
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None:
            runs = client.search_runs(client.search_experiments()[0].experiment_id) \
                if client.search_experiments() else []
            if runs and client.get_metric_history(runs[0].info.run_id, "pilot_loss"):
                break
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before the server could be stopped"
        os.killpg(server.pid, 15)  # the tracking server goes away mid-run
        server.wait(timeout=30)
        out, _ = job.communicate(timeout=400)
    assert job.returncode == 0, out[-4000:]
    assert "MLflow tracking failed" in out
    assert (run / "results.json").exists()
