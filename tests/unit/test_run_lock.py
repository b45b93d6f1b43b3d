"""The run lock (tcp.runtime.run_lock): one live job per folder, stale locks taken over, foreign
hosts refused, and no two jobs winning the same stale lock."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from tcp.runtime import run_lock
from tcp.runtime.run_lock import LOCK_NAME, LockError, RunLock, read_owner


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(folder, **changes) -> None:
    """A lock file as another job would have left it (fields overridden by `changes`)."""
    lock = RunLock(folder).acquire()
    owner = json.loads(lock.path.read_text()) | changes
    lock.path.write_text(json.dumps(owner))


def test_a_second_job_on_a_live_folder_is_refused_naming_the_first(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(LockError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "in use by a running tcp run" in msg and "\n" not in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in msg
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    RunLock(tmp_path).acquire().release()  # free again


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path):
    gone = dead_pid()
    write_lock(tmp_path, pid=gone)
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over is not None and lock.took_over.pid == gone
    assert read_owner(tmp_path / LOCK_NAME).pid == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing left aside
    lock.release()


def test_a_reused_pid_or_a_reboot_makes_the_lock_stale(tmp_path):
    write_lock(tmp_path, proc_start="1")  # our pid, but another process's start time
    assert RunLock(tmp_path).acquire().took_over is not None
    (tmp_path / LOCK_NAME).unlink()
    write_lock(tmp_path, boot_id="another-boot")
    assert RunLock(tmp_path).acquire().took_over is not None


def test_a_lock_held_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    write_lock(tmp_path, host="node-17", pid=4242)
    with pytest.raises(LockError, match="on another host .*node-17.*pid 4242.*last heartbeat "
                       r"\d+s ago.*delete .*" + LOCK_NAME):
        RunLock(tmp_path).acquire()
    assert read_owner(tmp_path / LOCK_NAME).host == "node-17"  # untouched


def test_a_lock_on_another_host_without_heartbeat_is_taken_over(tmp_path):
    """A node lost (or a job requeued elsewhere): its lock stops being touched."""
    write_lock(tmp_path, host="node-17", pid=4242)
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over.host == "node-17"
    assert "no heartbeat for" in lock.took_over.describe()
    lock.release()


def test_the_holder_keeps_its_lock_fresh(tmp_path):
    lock = RunLock(tmp_path).acquire().start_heartbeat(interval_s=0.05)
    old = time.time() - 3600
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert lock.heartbeat_age() < 5
    lock.release()
    assert not lock.path.exists()


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    write_lock_text = json.loads(lock.path.read_text()) | {"pid": 1, "started": 0.0}
    lock.path.write_text(json.dumps(write_lock_text))
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_output_dir_that_is_a_file_or_read_only_is_one_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LockError, match="is not a directory"):
        RunLock(f).acquire()
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LockError, match="writable"):
            RunLock(ro).acquire()
    finally:
        ro.chmod(0o700)


def _contend(folder, start, results) -> None:
    start.wait()
    try:
        RunLock(folder).acquire()
        results.put("won")
    except LockError:
        results.put("refused")
    start.wait()  # hold the lock (stay alive) until everyone has tried


def test_two_jobs_finding_the_same_stale_lock_cannot_both_win(tmp_path):
    ctx = mp.get_context("fork")
    for _ in range(3):
        write_lock(tmp_path, pid=dead_pid())
        start, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(tmp_path, start, results))
                 for _ in range(6)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=30) for _ in procs)
        for p in procs:
            p.join(timeout=30)
        assert got.count("won") == 1, got
        (tmp_path / LOCK_NAME).unlink()
