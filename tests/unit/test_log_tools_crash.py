"""A compact SIGKILLed at each of its fault points (a real subprocess, a real signal) leaves the
original store intact and verify-clean, and a rerun completes it and cleans up.

Points (tcp/log_tools/replace.py): 1 mid-copy, 2 after the new store is verified before the
swap, 3 between the two renames of the fallback swap (TCP_LOG_SWAP=rename), 4 after the swap
before the old store is removed (both swap paths).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tcp.cli.tcp_log import main
from tcp.log_tools.paths import marker_path, old_path, temp_path
from tcp.mistake_log.maintenance import verify
from tcp.runtime.run_lock import LOCK_NAME
from tests.helpers import ROOT
from tests.log_tools_helpers import digests, make_log


def killed_compact(log, point: int, swap: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TCP_FAULT_INJECT": f"kill@compact={point}", "TCP_LOG_SWAP": swap}
    return subprocess.run([sys.executable, "-m", "tcp.cli.tcp_log", "compact", str(log),
                           "--chunk-mib", "0.01"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def base_log(tmp_path_factory):
    return make_log(tmp_path_factory.mktemp("crash") / "mistake_log", steps=12)


@pytest.mark.parametrize("point,swap", [(1, "auto"), (2, "auto"), (3, "rename"), (4, "auto"),
                                        (4, "rename")])
def test_killed_compact_leaves_the_original_intact_and_a_rerun_completes(
        base_log, tmp_path, capsys, point, swap):
    log = tmp_path / "mistake_log"
    shutil.copytree(base_log, log)
    ref = digests(log)
    p = killed_compact(log, point, swap)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]

    # Where the original is now: in place (1, 2), or beside it once the swap began (3, 4).
    original = {1: log, 2: log, 3: old_path(log), 4: temp_path(log) if swap == "auto" else
                old_path(log)}[point]
    assert verify(original).ok and digests(original) == ref
    if log.exists():  # before the swap the original, after it the verified new store
        assert verify(log).ok and digests(log) == ref
    else:  # between the fallback's renames: tools point at the fix
        assert point == 3 and marker_path(log).exists()
        assert main(["info", str(log)]) == 2
        assert f"run `tcp-log compact {log}` to finish it" in capsys.readouterr().err

    assert main(["compact", str(log)]) == 0  # the rerun finishes or cleans up, then compacts
    err = capsys.readouterr().err
    assert "took over the stale lock" in err or point == 3
    assert ("removed" in err or "finished" in err), err
    assert verify(log).ok and digests(log) == ref
    for left in (temp_path(log), old_path(log), marker_path(log), log / LOCK_NAME):
        assert not left.exists(), left
