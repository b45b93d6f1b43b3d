"""Operating a run as a cluster operator does (2 CPU ranks under the real `deepspeed` runner):
a second run on a live folder is refused, SIGTERM to the runner ends in a checkpoint with no
rank left alive, a resume that fails changes nothing, and MLflow says how each run ended."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tcp.mistake_log.maintenance import verify
from tcp.training.checkpoint_layout import read_complete
from tests.distributed.test_resume import NO_MLFLOW, TINY, one_mlflow_run
from tests.helpers import JOINT_ONLY, ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LONG = (*TINY, "train.steps=40")  # long enough to act on while it runs


def wait_for(cond, *, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: "
                                 f"{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def snapshot(run: Path) -> dict[str, str]:
    """Every file under `run` with its SHA-256."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_second_run_on_a_live_folder_is_refused_and_the_first_finishes(tmp_path):
    run, release = tmp_path / "run", tmp_path / "release"
    # The first run holds at step 3 until the second has been refused (live however slow the
    # machine is), then finishes.
    first = launch(run, *TINY, "train.steps=12", NO_MLFLOW, popen=True, port=29410,
                   env={"TCP_FAULT_INJECT": "hold@step=3", "TCP_FAULT_RELEASE": str(release)})
    try:
        wait_for(lambda: (run / "mistake_log/rank00001").exists(), timeout=300,
                 what="the first run's Mistake Log", proc=first)
        second = launch(run, *LONG, NO_MLFLOW, check=False, port=29400)
        release.touch()
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        err = second.stderr.strip().splitlines()[-1]
        assert err.startswith("lock error: ") and "in use by a running tcp run" in err
        assert f"pid {first.pid}" not in err  # rank 0 holds it, not the runner
        assert "Pilot" not in second.stdout  # refused before any model was built
        out, _ = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-3000:]
    assert (run / "results.json").exists() and not (run / ".tcp.lock").exists()
    assert verify(run / "mistake_log").ok
    assert "replacing" not in out and "removing a previous run" not in out
    # DeepSpeed never unlinks its CPU all-reduce buffers (/dev/shm, ~64 MiB a rank); tcp does,
    # so neither the finished run nor the refused one leaves any.
    assert not [p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")
                if p.name.split("_")[-2] in ("29400", "29410")]


def test_sigterm_to_the_runner_checkpoints_and_leaves_no_rank_alive(tmp_path):
    run = tmp_path / "run"
    runner = launch(run, *LONG, popen=True)
    wait_for(lambda: (run / "checkpoints/step_00000004/manifest.json").exists(), timeout=300,
             what="the first checkpoint", proc=runner)
    below = psutil.Process(runner.pid).children(recursive=True)  # launch.py and the ranks
    assert sum("--local_rank" in " ".join(c.cmdline()) for c in below) == 2
    runner.send_signal(signal.SIGTERM)  # DeepSpeed's runner does not forward it
    out, _ = runner.communicate(timeout=120)  # the ranks hold the pipe open until they exit
    assert runner.returncode == -signal.SIGTERM  # the shell reports 143
    _, alive = psutil.wait_procs(below, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    assert "stopped (the deepspeed runner" in out, out[-3000:]
    latest = (run / "checkpoints/latest").read_text().strip()
    info = read_complete(run / "checkpoints" / latest)
    assert info is not None and info.step > 4
    rep = verify(run / "mistake_log")
    assert rep.ok and all(r.uncommitted_entries == 0 for r in rep.ranks)
    assert not (run / ".tcp.lock").exists()
    _, r = one_mlflow_run(run)
    assert r.info.status == "KILLED"
    # The run continues from where it stopped.
    p = launch(run, *LONG, "resume=auto", "train.steps=" + str(info.step + 2))
    assert f"{latest} at step {info.step}" in p.stdout


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    launch(run, *TINY)  # checkpoints at steps 4 and 8
    return run


@pytest.mark.parametrize("change,why", [
    ("mistake_log.replay_size=4", "sampler state has num=8"),
    ("data.train_size=300", "data position"),
])
def test_a_failed_resume_changes_nothing(finished, change, why):
    before = snapshot(finished)
    assert {"checkpoints/step_00000004/manifest.json",
            "checkpoints/step_00000008/manifest.json"} <= before.keys()
    p = launch(finished, *TINY, f"resume={finished / 'checkpoints/step_00000004'}", change,
               check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("resume error: cannot resume from") and why in err
    assert "nothing was changed" in err
    assert snapshot(finished) == before  # every checkpoint and log byte, config.yaml too
    _, r = one_mlflow_run(finished)  # re-attached, then ended FAILED with the reason
    assert r.info.status == "FAILED" and why in r.data.tags["tcp.error"]


def test_output_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    p = launch(f, *TINY, NO_MLFLOW, check=False, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("lock error: ")
    assert "is not a directory" in p.stderr and "Traceback" not in p.stderr


def test_srun_one_task_per_rank_and_sigterm_to_every_rank(tmp_path):
    """SLURM: `srun` starts each rank itself (SLURM_PROCID/NTASKS/LOCALID, no DeepSpeed
    launcher) and `scancel` or a preemption signals every one of them."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launcher/train.py"), "--config",
           str(ROOT / "configs/default.yaml"), JOINT_ONLY, f"output_dir={run}",
           f"tracking.uri=sqlite:///{run}.db", *LONG]
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29391"}
    ranks = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=base | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r in (0, 1)]
    try:
        wait_for(lambda: (run / "checkpoints/step_00000004/manifest.json").exists(),
                 timeout=300, what="the first checkpoint", proc=ranks[0])
        for p in ranks:
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in ranks] == [143, 143], outs[0][-3000:]
    assert "world=2" in outs[0] and "stopped (signal 15)" in outs[0]
    latest = (run / "checkpoints/latest").read_text().strip()
    assert read_complete(run / "checkpoints" / latest).step > 4
    assert verify(run / "mistake_log").ok
    _, r = one_mlflow_run(run)
    assert r.info.status == "KILLED"


def test_sigterm_to_tcp_launch_waits_for_the_checkpoint_and_exits_143(tmp_path):
    """Kubernetes signals the container's first process: `tcp-launch deepspeed ...` forwards
    it, waits for every process below it, and exits 143 once the checkpoint is written."""
    run = tmp_path / "run"
    top = launch(run, *LONG, NO_MLFLOW, popen=True, prefix=(sys.executable, "-m",
                                                             "tcp.cli.tcp_launch"))
    wait_for(lambda: (run / "checkpoints/step_00000004/manifest.json").exists(), timeout=300,
             what="the first checkpoint", proc=top)
    below = psutil.Process(top.pid).children(recursive=True)
    top.send_signal(signal.SIGTERM)
    out, _ = top.communicate(timeout=120)
    assert top.returncode == 143, out[-3000:]
    assert not [p for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert "stopped (the deepspeed runner" in out
    latest = (run / "checkpoints/latest").read_text().strip()
    assert read_complete(run / "checkpoints" / latest).step > 4
    assert verify(run / "mistake_log").ok


def test_sigterm_to_launch_py_checkpoints_within_deepspeeds_grace(tmp_path):
    """DeepSpeed's launch.py, when signalled, SIGTERMs each rank and gives it 30 s before
    SIGKILL: the ranks stop with a checkpoint in that time. launch.py itself then exits 1 (its
    own code, not ours), which the runner passes on."""
    run = tmp_path / "run"
    runner = launch(run, *LONG, NO_MLFLOW, popen=True)
    wait_for(lambda: (run / "checkpoints/step_00000004/manifest.json").exists(), timeout=300,
             what="the first checkpoint", proc=runner)
    below = psutil.Process(runner.pid).children(recursive=True)
    launch_py = [p for p in below if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    assert len(launch_py) == 1
    launch_py[0].send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=120)
    assert runner.returncode == 1, out[-3000:]
    _, alive = psutil.wait_procs(below, timeout=60)
    assert not alive
    assert "stopped (signal 15)" in out
    latest = (run / "checkpoints/latest").read_text().strip()
    assert read_complete(run / "checkpoints" / latest).step > 4
    rep = verify(run / "mistake_log")
    assert rep.ok and all(r.uncommitted_entries == 0 for r in rep.ranks)
