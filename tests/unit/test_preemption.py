"""Stop requests (tcp.runtime.preemption): a signal is recorded, the same stop fanned out twice
counts once, a later second signal forces; a rank notices its launcher's exit like a SIGTERM."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from tcp.runtime.preemption import LauncherWatch, StopSignal

ROOT = Path(__file__).resolve().parents[2]


def test_stop_signal_records_then_forces():
    stop = StopSignal().install()
    try:
        assert stop.should_stop(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(torch.device("cpu")) == signal.SIGTERM
        assert stop.reason == "signal 15"
        assert StopSignal.exit_code(signal.SIGTERM) == 143
    finally:
        stop.restore()
    # A repeat within the window is the same stop (SLURM and launch.py both signalling); a
    # second signal after it is a forced stop: the default action, killed by the signal.
    code = textwrap.dedent("""
        import os, signal, time
        import tcp.runtime.preemption as p
        p.REPEAT_WINDOW_S = 0.5
        s = p.StopSignal().install()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        print("survived the repeat", flush=True)
        time.sleep(0.7)
        os.kill(os.getpid(), signal.SIGTERM)
        print("survived the second", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "survived the repeat" in p.stdout and "second" not in p.stdout, p.stderr
    assert p.returncode == -signal.SIGTERM


def test_no_launcher_no_watch():
    """Under pytest (or plain `python launcher/train.py`) there is no DeepSpeed launcher above
    us: nothing is watched, so a shell's exit never stops a run."""
    watch = LauncherWatch(StopSignal())
    assert watch.chain == []
    watch.start().close()


# A fake process tree with DeepSpeed's shape: runner -> launch.py -> rank. The marker words
# are in each process's command line, as they are in the real ones.
RANK = textwrap.dedent("""
    import sys, time
    from tcp.runtime.preemption import LauncherWatch, StopSignal, launcher_chain
    stop = StopSignal()
    watch = LauncherWatch(stop, interval_s=0.1).start()
    print("chain", len(launcher_chain()), flush=True)
    t0 = time.time()
    while stop.received is None and time.time() - t0 < 20:
        time.sleep(0.05)
    print("stop", stop.received, stop.reason, flush=True)
""")
LAUNCH = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])"
RUNNER = ("import subprocess, sys; "
          "subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2], "
          "'deepspeed.launcher.launch'])")


def test_a_rank_treats_its_runner_exiting_like_sigterm(tmp_path):
    out = tmp_path / "rank.out"
    with open(out, "w") as f:
        runner = subprocess.Popen([sys.executable, "-c", RUNNER, LAUNCH, RANK, "deepspeed"],
                                  cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while "chain" not in out.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert "chain 2" in out.read_text(), out.read_text()
        runner.send_signal(signal.SIGTERM)  # the runner has no handler: it just dies
        assert runner.wait(timeout=10) == -signal.SIGTERM
        deadline = time.time() + 10  # the rank (now an orphan's child) notices and stops
        while "stop" not in out.read_text() and time.time() < deadline:
            time.sleep(0.05)
    text = out.read_text()
    assert f"stop 15 the deepspeed runner (pid {runner.pid}) exited" in text, text


def test_a_rank_treats_launch_py_exiting_like_sigterm(tmp_path):
    out = tmp_path / "rank.out"
    with open(out, "w") as f:
        launch = subprocess.Popen([sys.executable, "-c", LAUNCH, RANK,
                                   "deepspeed.launcher.launch"], cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while "chain" not in out.read_text() and time.time() < deadline:
            time.sleep(0.05)
        assert "chain 1" in out.read_text(), out.read_text()
        launch.kill()
        launch.wait()
        deadline = time.time() + 10
        while "stop" not in out.read_text() and time.time() < deadline:
            time.sleep(0.05)
    text = out.read_text()
    assert f"stop 15 DeepSpeed's launch.py (pid {launch.pid}) exited" in text, text
