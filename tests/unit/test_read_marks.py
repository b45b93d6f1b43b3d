"""Read marks (tcp/runtime/read_marks.py): a folder an offline job reads is not changed under it."""

from __future__ import annotations

import json
import os
import time

import pytest

from tcp.cli.tcp_log import main
from tcp.errors import RunError
from tcp.runtime import run_lock
from tcp.runtime.read_marks import READERS, ReadMark, live_readers, refuse_if_read
from tcp.runtime.run_folder import claim_paths
from tcp.runtime.run_lock import LockError, RunLock
from tests.log_tools_helpers import make_log, snapshot
from tests.unit.test_run_lock import dead_pid


def _forge(folder, **changes) -> None:
    """A mark as another process would have left it (owner fields overridden by `changes`)."""
    mark = ReadMark(folder).acquire(why="-")
    path = mark.path
    owner = json.loads(path.read_text()) | changes
    mark.path = None  # keep the file: it now stands for that other process
    mark.release()
    path.write_text(json.dumps(owner))


def test_a_live_reader_blocks_changes_and_release_frees_the_folder(tmp_path):
    mark = ReadMark(tmp_path).acquire(why="-")
    assert [o.pid for o in live_readers(tmp_path)] == [os.getpid()]
    with pytest.raises(LockError, match="being read by a tcp offline training .*pid "
                       f"{os.getpid()}.*; do this instead"):
        refuse_if_read(tmp_path, what_to_do="do this instead")
    mark.release()
    assert live_readers(tmp_path) == []
    refuse_if_read(tmp_path, what_to_do="-")
    ReadMark(tmp_path).acquire(why="-").release()  # several readers over time: fine
    two = [ReadMark(tmp_path).acquire(why="-") for _ in range(2)]  # and at once
    assert len(live_readers(tmp_path)) == 2
    for m in two:
        m.release()


def test_marks_of_gone_processes_are_ignored_and_removed(tmp_path):
    _forge(tmp_path, pid=dead_pid())
    _forge(tmp_path, boot_id="another-boot")
    assert live_readers(tmp_path) == []
    assert list((tmp_path / READERS).glob("*.json")) == []
    _forge(tmp_path, host="node-17", pid=4242)  # another host: live while its heartbeat is
    assert [o.host for o in live_readers(tmp_path)] == ["node-17"]
    old = time.time() - run_lock.STALE_AFTER_S - 60
    for p in (tmp_path / READERS).glob("*.json"):
        os.utime(p, (old, old))
    assert live_readers(tmp_path) == []


def test_a_reader_is_refused_by_a_live_run_and_leaves_no_mark(tmp_path):
    lock = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(LockError, match=r"in use by a running tcp run.*; wait for it"):
            ReadMark(tmp_path).acquire(why="wait for it")
        assert list((tmp_path / READERS).glob("*")) == []
    finally:
        lock.release()


def test_a_run_is_refused_a_folder_being_read_and_keeps_no_lock(tmp_path):
    mark = ReadMark(tmp_path).acquire(why="-")
    try:
        with pytest.raises(RunError, match="being read by a tcp offline training"):
            claim_paths([tmp_path], rank=0)
        assert not (tmp_path / run_lock.LOCK_NAME).exists()
    finally:
        mark.release()
    claim_paths([tmp_path], rank=0).release()


def test_log_tools_refuse_a_log_being_read(tmp_path, capsys):
    log = make_log(tmp_path / "mistake_log", steps=8)
    mark = ReadMark(log).acquire(why="-")
    try:
        snap = snapshot(log)
        for argv in (["prune", str(log), "--keep-last-steps", "3", "--apply"],
                     ["compact", str(log)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("lock error: ")
            assert "being read by a tcp offline training" in err and "nothing was changed" in err
            assert snapshot(log) == snap
        assert main(["verify", str(log)]) == 0  # reading alongside is fine
    finally:
        mark.release()
    assert main(["compact", str(log)]) == 0
    assert not (log / READERS).exists() or list((log / READERS).iterdir()) == []
