"""The streaming sampler: deterministic, exact resume, uncommitted steps read from memory
exactly as from disk, same draw as RAM."""

import shutil
import threading
import time

import pytest
import torch

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.async_writer import AsyncWriter
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.format import Schema
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.sampler import StreamingSampler
from tcp.mistake_log.shard_writer import RankStoreWriter
from tests.helpers import fake_entries
from tests.unit.test_zarr_store import SMALL, assert_same, write_steps


def key(b):
    return sorted(zip(b.step.tolist(), b.sample_id.tolist(), strict=True))


def sampler(root, **kw):
    args = dict(seed=3, rank=0, num=6, window_steps=8, lag_steps=1, prefetch=2) | kw
    return StreamingSampler(RankStoreReader(root, 0), **args)


def test_deterministic_and_within_window(tmp_path):
    write_steps(tmp_path, range(40), commit_every=7)
    a, b = sampler(tmp_path), sampler(tmp_path, prefetch=0)
    for step in range(0, 41):
        x, y = a.sample(step), b.sample(step)
        if step <= 1:  # window [step - 9, step - 1) is empty
            assert x is None and y is None
            continue
        assert key(x) == key(y)
        assert_same(x, y)
        lo, hi = max(0, step - 9), step - 1
        assert all(lo <= s < hi for s in x.step.tolist())
        if 4 * (hi - lo) >= 6:  # without replacement while the window holds enough entries
            assert x.sample_id.unique().numel() == x.num_entries
    assert key(sampler(tmp_path, seed=4).sample(30)) != key(a.draw(30))
    assert key(sampler(tmp_path, rank=1).draw(30)) != key(a.draw(30))
    a.close()


def test_resumes_exactly_from_state_dict(tmp_path):
    write_steps(tmp_path, range(30))
    a = sampler(tmp_path, recency_half_life=4.0)
    first = [key(a.sample(s)) for s in range(10, 20)]
    state = a.state_dict()
    rest = [key(a.sample(s)) for s in range(20, 30)]
    b = sampler(tmp_path, recency_half_life=4.0)
    b.load_state_dict(state)
    assert b.last_step == 19
    assert [key(b.sample(s)) for s in range(20, 30)] == rest
    assert first != rest
    with pytest.raises(ValueError, match="seed"):
        sampler(tmp_path, seed=9, recency_half_life=4.0).load_state_dict(state)


def test_same_draw_as_the_memory_log(tmp_path):
    """With lag 0 the window is the memory backend's [t - window, t): the same entries, in
    the trainer's order (step t is appended before step t samples)."""
    write_steps(tmp_path, range(25))
    mem = MemoryMistakeLog(window_steps=8, seed=3, rank=0)
    st = sampler(tmp_path, lag_steps=0)
    for step in range(25):
        mem.append(fake_entries(step))
        a, b = st.sample(step), mem.sample(step=step, num=6)
        assert (a is None) == (b is None) == (step == 0)
        if a is not None:
            assert key(a) == key(b)


def test_recency_weighting_prefers_recent_steps(tmp_path):
    write_steps(tmp_path, range(200))
    flat = sampler(tmp_path, num=400, window_steps=None, prefetch=0).draw(200)
    recent = sampler(tmp_path, num=400, window_steps=None, recency_half_life=10.0,
                     prefetch=0).draw(200)
    assert flat.step.float().mean() < 120 < recent.step.float().mean()
    assert recent.step.min() >= 0 and recent.step.max() <= 198
    # 'all' covers the whole log, not just a window
    assert flat.step.min() < 20


@pytest.mark.parametrize("dtype,keepbits", [("float32", None), ("bfloat16", None),
                                             ("float16", 6)])
@pytest.mark.parametrize("commit_every", [1, 3])
def test_uncommitted_steps_replay_exactly_as_they_read_back(tmp_path, dtype, keepbits,
                                                            commit_every):
    """A slow writer that commits every few steps never changes what is drawn: steps not
    committed yet are read from the writer's memory in stored form (dtype, lossy rounding),
    bit for bit what the same draw reads from disk afterwards."""
    cfg = ZarrStoreConfig(chunk_mib=SMALL, lossy_keepbits=keepbits)
    write_steps(tmp_path, range(1), cfg=cfg, dtype=dtype)
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, dtype), cfg)
    real = store.commit

    def slow_commit():
        time.sleep(0.03)
        return real()

    store.commit = slow_commit  # type: ignore[method-assign]
    w = AsyncWriter(store, queue_depth=16, commit_every=commit_every)
    from_ram = []

    def tail(s):
        u = w.uncommitted(s, timeout=30)
        read = u.read
        u.read = lambda idx: (from_ram.append(len(idx)), read(idx))[1]  # type: ignore[method-assign]
        return u

    live = sampler(tmp_path, lag_steps=0, prefetch=2, tail=tail, submitted=w.submitted_through)
    got = {}
    for step in range(1, 20):
        w.submit(fake_entries(step))
        got[step] = live.sample(step)  # needs steps < step: often not committed yet
    w.close()
    live.close()
    assert sum(from_ram) > 0  # some draws did read uncommitted entries
    offline = sampler(tmp_path, lag_steps=0, prefetch=0)
    for step, b in got.items():
        ref = offline.draw(step)
        for name, t in ref.state_dict().items():
            assert t.dtype == getattr(b, name).dtype, (step, name)
            assert torch.equal(getattr(b, name), t), (step, name)


def test_wait_times_out_with_a_clear_error(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    w = AsyncWriter(store)
    release = threading.Event()
    real = store.commit
    store.commit = lambda: (release.wait(), real())[1]  # type: ignore[method-assign]
    w.submit(fake_entries(0))
    with pytest.raises(TimeoutError, match="step 0 of the Mistake Log not committed"):
        w.wait_committed(0, timeout=0.2)
    release.set()
    w.close()


def test_zarr_log_behind_the_mistake_log_interface(tmp_path):
    cfg = ZarrStoreConfig(chunk_mib=SMALL, replay_lag_steps=1)
    log = ZarrMistakeLog(tmp_path, rank=0, schema=Schema(16, 3, "float32"), cfg=cfg,
                         window_steps=4, replay_size=5, seed=1)
    seen = []
    for step in range(12):
        log.append(fake_entries(step))
        b = log.sample(step=step, num=5)
        if b is not None:
            seen.append(key(b))
            assert all(step - 5 <= s < step - 1 for s in b.step.tolist())
    state = log.state_dict()
    log.close()
    assert len(log) == 48 and log.metrics()["committed_entries"] == 48
    assert state["committed"]["last_step"] == 11 and state["sampler"]["last_step"] == 11
    assert torch.tensor(len(seen)) == 10


def test_cached_tail_chunk_serves_only_rows_it_holds(tmp_path):
    """A reader that cached the open tail chunk still sees rows committed after that read."""
    w = write_steps(tmp_path, range(3))
    rd = RankStoreReader(tmp_path, 0)
    first = rd.read_range(0, rd.num_entries)  # caches the partial tail chunks
    for s in range(3, 6):
        w.append(fake_entries(s))
        w.commit()
    rd.refresh()
    assert_same(rd.read_range(0, rd.num_entries), MistakeBatch.cat(
        [first, *[fake_entries(s) for s in range(3, 6)]], device="cpu"))


def test_run_replaces_a_previous_log_and_refuses_other_directories(tmp_path):
    from tcp.config import load_config
    from tcp.training.build import build_mistake_log

    cfg = load_config(None, [f"output_dir={tmp_path}", "mistake_log.topk=3"])
    log = build_mistake_log(cfg, tmp_path, rank=0, d_model=16, vocab=100)
    log.append(fake_entries(0))
    log.close()
    assert RankStoreReader(tmp_path / "mistake_log", 0).num_entries == 4
    again = build_mistake_log(cfg, tmp_path, rank=0, d_model=16, vocab=100)  # a fresh run
    assert len(again) == 0
    again.close()
    other = tmp_path / "not_a_log"
    other.mkdir()
    empty = load_config(None, [f"mistake_log.store.path={other}"])
    build_mistake_log(empty, tmp_path, rank=0, d_model=16, vocab=100).close()  # empty: fine
    shutil.rmtree(other)
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    bad = load_config(None, [f"mistake_log.store.path={other}"])
    with pytest.raises(RuntimeError, match="is not a tcp Mistake Log"):
        build_mistake_log(bad, tmp_path, rank=0, d_model=16, vocab=100)
    assert (other / "precious.txt").read_text() == "keep me"


def test_default_window_offers_the_previous_step(tmp_path):
    """The method's window [t - W, t): with the default configuration step t - 1's entries are
    eligible at step t (once a lag of one step left them out)."""
    from tcp.config import load_config

    ml = load_config(None).mistake_log
    log = ZarrMistakeLog(tmp_path, rank=0, schema=Schema(16, 3, "float32"),
                         cfg=ZarrStoreConfig(chunk_mib=SMALL,
                                             replay_lag_steps=ml.store.replay_lag_steps),
                         window_steps=ml.window_steps, replay_size=ml.replay_size, seed=1)
    assert log.sampler.window(200) == (200 - ml.window_steps, 200)
    log.append(fake_entries(0))
    b = log.sample(step=1, num=ml.replay_size)  # only step 0 is in the log
    assert b is not None and set(b.step.tolist()) == {0}
    for step in range(1, 6):
        log.append(fake_entries(step))
        b = log.sample(step=step + 1, num=ml.replay_size)
        assert b is not None and step in set(b.step.tolist())  # 32 draws of 4 entries per step
    log.close()
