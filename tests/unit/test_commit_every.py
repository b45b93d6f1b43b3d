"""The asynchronous writer commits every `commit_every` steps (and on flush, wait_committed,
close); uncommitted steps stay out of the store until then but are replayable in memory."""

import json
import time

import torch

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.async_writer import AsyncWriter
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.format import Schema
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.shard_writer import RankStoreWriter
from tests.helpers import fake_entries
from tests.unit.test_zarr_store import SMALL


def committed(root):
    return json.loads((root / "rank00000" / "manifest.json").read_text())["entries"]


def settle(w, n, timeout=10.0):
    """Wait until the worker has appended `n` steps (they are out of the queue)."""
    deadline = time.monotonic() + timeout
    while len(w._appended) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_commits_every_n_steps_and_on_flush(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    w = AsyncWriter(store, commit_every=4)
    for s in range(3):
        w.submit(fake_entries(s))
        settle(w, s + 1)
    assert w.metrics.commits == 0 and committed(tmp_path) == 0  # 3 steps: not yet
    u = w.uncommitted(2)
    assert (u.entries, u.last_step, [it.last_step for it in u.items]) == (0, None, [0, 1, 2])
    w.submit(fake_entries(3))
    w.wait_committed(3, timeout=10)
    assert w.metrics.commits == 1 and committed(tmp_path) == 16
    assert w.uncommitted(3).items == []
    w.submit(fake_entries(4))
    w.flush()  # a checkpoint's flush commits the partial group
    assert w.metrics.commits == 2 and committed(tmp_path) == 20
    w.submit(fake_entries(5))
    w.close()
    assert w.metrics.commits == 3 and committed(tmp_path) == 24


def test_wait_committed_asks_for_the_commit(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    w = AsyncWriter(store, commit_every=1000)
    w.submit(fake_entries(0))
    w.submit(fake_entries(1))
    t0 = time.monotonic()
    w.wait_committed(0, timeout=10)  # would wait for 1000 steps without asking
    assert time.monotonic() - t0 < 10 and committed(tmp_path) >= 4
    w.close()
    assert committed(tmp_path) == 8


def test_zarr_log_state_dict_covers_uncommitted_steps(tmp_path):
    """A checkpoint's cursor holds every step appended so far, whatever commit_every is."""
    cfg = ZarrStoreConfig(chunk_mib=SMALL, commit_every_steps=8)
    log = ZarrMistakeLog(tmp_path, rank=0, schema=Schema(16, 3, "float32"), cfg=cfg,
                         window_steps=4, replay_size=5, seed=0)
    for s in range(5):
        log.append(fake_entries(s))
        if s:
            assert log.sample(step=s, num=5) is not None  # step s-1 replayable, uncommitted
    state = log.state_dict()
    assert state["committed"]["entries"] == 20 and state["committed"]["last_step"] == 4
    assert log.writer.metrics.commits == 1
    log.close()
    rd = RankStoreReader(tmp_path, 0)
    assert torch.equal(rd.read_range(0, 20).step, torch.arange(5).repeat_interleave(4))
