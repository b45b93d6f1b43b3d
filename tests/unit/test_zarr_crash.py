"""A writer process killed with SIGKILL leaves a store that opens, verifies and returns every
committed entry."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcp.mistake_log.maintenance import verify
from tcp.mistake_log.reader import RankStoreReader
from tests.unit.test_zarr_store import SMALL, assert_same, expected

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, time
sys.path.append({root!r})
from tcp.config import ZarrStoreConfig
from tcp.mistake_log.shard_writer import RankStoreWriter
from tcp.mistake_log.format import Schema
from tcp.mistake_log.async_writer import AsyncWriter
from tests.helpers import fake_entries

store = RankStoreWriter({path!r}, 0, Schema(16, 3, "float32"),
                        ZarrStoreConfig(chunk_mib={chunk}, shard_chunks={shards}))
pause_at = {pause_at}
real = store._publish
def publish():
    if store.manifest.commits == pause_at:  # chunks of this commit are on disk, manifest is not
        print("PUBLISHING", flush=True)
        time.sleep(60)
    real()
store._publish = publish
w = AsyncWriter(store, queue_depth=4)
print("READY", flush=True)
for s in range(100000):
    w.submit(fake_entries(s))
"""


def spawn(path, *, pause_at=-1, shards=0):
    code = CHILD.format(root=str(ROOT), path=str(path), chunk=SMALL, shards=shards,
                        pause_at=pause_at)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def commits(path):
    try:
        return json.loads((Path(path) / "rank00000" / "manifest.json").read_text())["commits"]
    except (OSError, ValueError):
        return 0


def check_store(path):
    rep = verify(path)
    assert rep.ok, rep.summary()
    rd = RankStoreReader(path, 0)
    n = rd.num_entries
    assert n > 0 and n % 4 == 0
    last = rd.manifest.last_step
    assert_same(rd.read_range(0, n), expected(range(last + 1)))
    return rep


@pytest.mark.parametrize("delay,shards", [(0.0, 0), (0.013, 0), (0.031, 4), (0.057, 0)])
def test_sigkill_at_a_random_moment(tmp_path, delay, shards):
    p = spawn(tmp_path, shards=shards)
    try:
        deadline = time.time() + 60
        while commits(tmp_path) < 5 and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    check_store(tmp_path)


def test_sigkill_between_chunk_writes_and_manifest(tmp_path):
    p = spawn(tmp_path, pause_at=6)
    try:
        line = ""
        deadline = time.time() + 60
        while "PUBLISHING" not in line and time.time() < deadline:
            line = p.stdout.readline()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    rep = check_store(tmp_path)
    assert rep.ranks[0].uncommitted_entries > 0  # written, never committed, ignored
    assert RankStoreReader(tmp_path, 0).manifest.commits == 5  # the 6th never published
