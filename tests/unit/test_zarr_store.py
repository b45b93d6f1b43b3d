"""The on-disk Mistake Log: round trips per codec, commit protocol, corruption, the writer."""

import json
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.async_writer import AsyncWriter, MistakeLogWriteError
from tcp.mistake_log.format import MistakeLogCorrupt, Schema
from tcp.mistake_log.maintenance import verify
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.shard_writer import RankStoreWriter
from tests.helpers import fake_entries
from tools.mistake_log import main as mistake_log_tool

SMALL = 64 * 16 * 4 / 2**20  # chunk_mib giving 64-row chunks at d=16 float32


def write_steps(root, steps, *, cfg=None, dtype="float32", rank=0, commit_every=1):
    w = RankStoreWriter(root, rank, Schema(16, 3, dtype), cfg or ZarrStoreConfig(chunk_mib=SMALL))
    for i, s in enumerate(steps):
        w.append(fake_entries(s, rank=rank))
        if (i + 1) % commit_every == 0:
            w.commit()
    w.commit()
    return w


def expected(steps, rank=0):
    return MistakeBatch.cat([fake_entries(s, rank=rank) for s in steps], device="cpu")


def assert_same(got, ref, *, state_rtol=0.0, state_dtype=torch.float32):
    for name, t in ref.state_dict().items():
        g = getattr(got, name)
        if name in ("h", "x_tilde"):
            torch.testing.assert_close(g.float(), t.to(state_dtype).float(), rtol=state_rtol,
                                       atol=0.0)
        else:
            assert torch.equal(g, t), name


CODECS = {
    "zstd": ZarrStoreConfig(chunk_mib=SMALL),
    "zstd-nochecksum": ZarrStoreConfig(chunk_mib=SMALL, checksum=False),
    "blosc-shuffle": ZarrStoreConfig(chunk_mib=SMALL, compressor="blosc", level=5),
    "blosc-noshuffle": ZarrStoreConfig(chunk_mib=SMALL, compressor="blosc", shuffle=False),
    "none": ZarrStoreConfig(chunk_mib=SMALL, compressor="none"),
    "sharded": ZarrStoreConfig(chunk_mib=SMALL, shard_chunks=4),
}


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_exact_round_trip(tmp_path, name, dtype):
    steps = list(range(40))  # ~440 token rows: several chunks, partial tails rewritten
    write_steps(tmp_path, steps, cfg=CODECS[name], dtype=dtype, commit_every=3)
    rd = RankStoreReader(tmp_path, 0)
    assert rd.num_entries == 4 * len(steps)
    got = rd.read_range(0, rd.num_entries)
    assert got.h.dtype == getattr(torch, dtype)
    assert_same(got, expected(steps), state_dtype=getattr(torch, dtype))
    sub = rd.read([7, 2, 100, 2])
    tiny_cache = RankStoreReader(tmp_path, 0, cache_mib=0)  # every chunk evicted at once
    assert_same(tiny_cache.read([7, 2, 100, 2]), sub, state_dtype=getattr(torch, dtype))
    assert_same(sub, expected(steps).select([7, 2, 100, 2]), state_dtype=getattr(torch, dtype))
    assert verify(tmp_path).ok


@pytest.mark.parametrize("cache_chunks", [0.5, 1, 3])
def test_a_read_cache_smaller_than_one_call_still_reads_right(tmp_path, cache_chunks):
    """Reads that mix cached chunks with chunks they fetch, through a cache smaller than one
    call's chunks: the fetches must not evict a hit this call still needs (once a KeyError
    after ~90 steps of a default run)."""
    steps = list(range(40))
    write_steps(tmp_path, steps, commit_every=3)
    ref = expected(steps)
    rd = RankStoreReader(tmp_path, 0, cache_mib=cache_chunks * SMALL)
    rng = np.random.default_rng(0)
    for _ in range(25):
        idx = rng.choice(rd.num_entries, size=int(rng.integers(1, 12)), replace=False)
        assert_same(rd.read(idx), ref.select(idx.tolist()))
    assert rd._cache_bytes <= max(rd.cache_bytes, max(c.nbytes for c in rd._cache.values()))


@pytest.mark.parametrize("dtype,keepbits", [("float32", 10), ("float32", 4), ("float16", 7)])
def test_lossy_states_within_stated_bound(tmp_path, dtype, keepbits):
    cfg = ZarrStoreConfig(chunk_mib=SMALL, lossy_keepbits=keepbits)
    steps = list(range(12))
    write_steps(tmp_path, steps, cfg=cfg, dtype=dtype)
    rd = RankStoreReader(tmp_path, 0)
    bound = json.loads((tmp_path / "rank00000" / "manifest.json").read_text())["codec"][
        "max_relative_error"]
    assert bound == 2.0 ** -(keepbits + 1)
    got, ref = rd.read_range(0, rd.num_entries), expected(steps)
    for name in ("h", "x_tilde"):
        exact = getattr(ref, name).to(getattr(torch, dtype)).float()
        err = (getattr(got, name).float() - exact).abs()
        tiny = torch.finfo(getattr(torch, dtype)).tiny
        normal = exact.abs() >= tiny
        rel = (err[normal] / exact[normal].abs()).max().item()
        assert 0 < rel <= bound  # lossy, but no worse than stated (normal numbers)
        assert (err[~normal] <= bound * tiny).all()  # subnormals: absolute bound
    for name in ("labels", "topk_ids", "topk_probs", "residual", "loss", "step"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name  # lossless elsewhere


def test_reopen_appends_after_committed_entries(tmp_path):
    write_steps(tmp_path, range(10))
    write_steps(tmp_path, range(10, 25))  # a second writer (e.g. a resumed run) appends
    rd = RankStoreReader(tmp_path, 0)
    assert_same(rd.read_range(0, rd.num_entries), expected(range(25)))
    assert rd.entry_range(10, 12) == (40, 48)
    with pytest.raises(ValueError, match="must not decrease"):
        w = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
        w.append(fake_entries(3))
    with pytest.raises(ValueError, match=r"same mistake_log\.store codec"):
        RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"),
                        ZarrStoreConfig(chunk_mib=SMALL, compressor="blosc"))
    with pytest.raises(ValueError, match="existing Mistake Log"):
        RankStoreWriter(tmp_path, 0, Schema(32, 3, "float32"), ZarrStoreConfig())


def test_rollback_to_a_checkpoint_cursor_logs_each_step_once(tmp_path):
    """Resume: entries committed after the checkpoint's cursor are forgotten, the resumed run
    re-logs those steps (here with different values), and every step is in the log once."""
    w = write_steps(tmp_path, range(7), commit_every=2)
    cursor = w.manifest.to_json()  # what a checkpoint at step 7 records (after a flush)
    for s in range(7, 12):  # the run goes on past the checkpoint, then dies
        w.append(fake_entries(s))
        w.commit()
    w2 = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    assert w2.rollback(cursor) == 20
    assert RankStoreReader(tmp_path, 0).num_entries == 28
    assert verify(tmp_path).ranks[0].uncommitted_entries == 20  # the abandoned rows, ignored
    for s in range(7, 15):
        w2.append(fake_entries(s, seed=1))
        w2.commit()
    rd = RankStoreReader(tmp_path, 0)
    want = MistakeBatch.cat([expected(range(7)), *[fake_entries(s, seed=1) for s in range(7, 15)]],
                           device="cpu")
    assert_same(rd.read_range(0, rd.num_entries), want)
    assert verify(tmp_path).ok
    # A cursor from beyond what the shard holds (another log) is refused.
    bad = dict(cursor, entries=10**6, tokens=10**7, prompt_rows=10**7)
    with pytest.raises(MistakeLogCorrupt, match="beyond what this shard committed"):
        RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"),
                        ZarrStoreConfig(chunk_mib=SMALL)).rollback(bad)


def test_async_writer_rollback_and_reader_reset(tmp_path):
    cfg = ZarrStoreConfig(chunk_mib=SMALL)
    with AsyncWriter(RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), cfg)) as aw:
        for s in range(6):
            aw.submit(fake_entries(s))
        aw.flush()
        cursor = aw.store.manifest.to_json()
        for s in range(6, 9):
            aw.submit(fake_entries(s))
    rd = RankStoreReader(tmp_path, 0)
    rd.read_range(0, rd.num_entries)  # cache the chunks holding steps 6..8
    with AsyncWriter(RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), cfg)) as aw:
        assert aw.rollback(cursor) == 12 and aw.metrics.committed_entries == 24
        assert not aw.submitted_through(6)
        for s in range(6, 8):
            aw.submit(fake_entries(s, seed=2))
    with pytest.raises(MistakeLogCorrupt, match="went backwards"):
        rd.refresh()
    rd.reset()
    assert_same(rd.read_range(0, rd.num_entries),
                MistakeBatch.cat([expected(range(6)), fake_entries(6, seed=2),
                                  fake_entries(7, seed=2)], device="cpu"))


def test_readable_with_plain_zarr(tmp_path):
    write_steps(tmp_path, range(5))
    g = zarr.open_group(tmp_path, mode="r")
    assert g.attrs["format"] == "tcp-mistake-log"
    man = json.loads((tmp_path / "rank00000" / "manifest.json").read_text())
    r = g["rank00000"]
    n = man["entries"]
    ys, yl = r["y_start"][:n], r["y_len"][:n]
    i = 13
    h = r["h"][ys[i]:ys[i] + yl[i]]
    np.testing.assert_array_equal(h, expected(range(5)).select([i]).h.numpy())


def test_uncommitted_tail_is_ignored_and_reported(tmp_path):
    w = write_steps(tmp_path, range(6))
    w.append(fake_entries(6))
    # Write the chunks of step 6 but stop before the manifest, as a crash there would.
    w._publish = lambda: None  # type: ignore[method-assign]
    w.commit()
    rd = RankStoreReader(tmp_path, 0)
    assert rd.num_entries == 24 and rd.manifest.last_step == 5
    assert_same(rd.read_range(0, 24), expected(range(6)))
    rep = verify(tmp_path)
    assert rep.ok and rep.ranks[0].uncommitted_entries == 4


def test_corrupt_chunk_is_detected(tmp_path):
    write_steps(tmp_path, range(20))
    assert mistake_log_tool(["verify", str(tmp_path)]) == 0
    chunk = sorted((tmp_path / "rank00000" / "h" / "c").rglob("*"))
    victim = next(p for p in chunk if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rep = verify(tmp_path)
    assert not rep.ok and any(e.startswith("h:") for e in rep.ranks[0].errors)
    assert mistake_log_tool(["verify", str(tmp_path)]) == 1
    assert mistake_log_tool(["verify", "--quick", str(tmp_path)]) == 0  # metadata is fine
    with pytest.raises(ValueError, match="CRC32C"):
        RankStoreReader(tmp_path, 0).read_range(0, 80)


def test_stale_chunk_fails_the_manifest_digest(tmp_path):
    """A chunk that decodes fine but holds other rows (e.g. a stale copy) fails the digest."""
    write_steps(tmp_path, range(3), cfg=ZarrStoreConfig(chunk_mib=SMALL, checksum=False))
    arr = zarr.open_array(tmp_path / "rank00000" / "labels", mode="r+")
    arr[0] = arr[0] + 1
    rep = verify(tmp_path)
    assert not rep.ok and any("labels: digest" in e for e in rep.ranks[0].errors)


def test_async_writer_round_trip_and_metrics(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    with AsyncWriter(store, queue_depth=2) as w:
        for s in range(30):
            assert w.submit(fake_entries(s))
    m = w.metrics.as_dict()
    assert m["committed_entries"] == 120 and m["dropped_entries"] == 0
    assert m["raw_bytes"] > 0 and m["stored_bytes"] > 0 and m["latency_p50_s"] > 0
    rd = RankStoreReader(tmp_path, 0)
    assert_same(rd.read_range(0, 120), expected(range(30)))


def test_worker_exception_surfaces_on_next_call(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    w = AsyncWriter(store)
    w.submit(fake_entries(0))
    w.flush()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    store._write_rows = disk_full  # type: ignore[method-assign]
    w.submit(fake_entries(1))  # fails in the worker, not here
    with pytest.raises(MistakeLogWriteError, match="No space left"):
        for s in range(2, 50):
            w.submit(fake_entries(s))
            time.sleep(0.01)
    with pytest.raises(MistakeLogWriteError):
        w.wait_committed(0)
    with pytest.raises(MistakeLogWriteError):
        w.close()
    rd = RankStoreReader(tmp_path, 0)
    assert rd.num_entries == 4  # step 0 committed and intact
    assert_same(rd.read_range(0, 4), expected([0]))
    assert verify(tmp_path).ok


def test_bad_entries_fail_at_submit(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    with AsyncWriter(store) as w:
        w.submit(fake_entries(1))
        with pytest.raises(ValueError, match="d=8"):
            w.submit(fake_entries(2, d=8))
        with pytest.raises(ValueError, match="must not decrease"):
            w.submit(fake_entries(0))
        w.submit(fake_entries(2))
    assert RankStoreReader(tmp_path, 0).num_entries == 8


def test_drop_policy_counts_and_warns(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    real = store.commit

    def slow_commit():
        time.sleep(0.05)
        return real()

    store.commit = slow_commit  # type: ignore[method-assign]
    with pytest.warns(RuntimeWarning, match="dropped"), \
            AsyncWriter(store, queue_depth=1, on_full="drop") as w:
        kept = sum(w.submit(fake_entries(s)) for s in range(20))
    assert kept < 20
    assert w.metrics.dropped_entries == 4 * (20 - kept)
    assert RankStoreReader(tmp_path, 0).num_entries == 4 * kept
    assert verify(tmp_path).ranks[0].dropped_entries == 4 * (20 - kept)


def test_concurrent_reader_sees_only_committed_entries(tmp_path):
    store = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    real = store._write_rows

    def slow_rows(*a, **k):  # widen the window between chunk writes and the manifest
        time.sleep(0.002)
        return real(*a, **k)

    store._write_rows = slow_rows  # type: ignore[method-assign]
    ref = expected(range(60))
    seen, errors = [], []
    done = threading.Event()

    def read_loop():
        rd = RankStoreReader(tmp_path, 0)
        while not done.is_set() or rd.num_entries < 240:
            try:
                n = rd.refresh().entries
                if n:
                    got = rd.read_range(0, n)
                    assert_same(got, ref.select(list(range(n))))
                    assert n % 4 == 0  # whole steps only
                seen.append(n)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    t = threading.Thread(target=read_loop)
    t.start()
    with AsyncWriter(store, queue_depth=4) as w:
        for s in range(60):
            w.submit(fake_entries(s))
            time.sleep(0.003)
    done.set()
    t.join(timeout=60)
    assert not errors, errors[0]
    assert seen == sorted(seen) and len(set(seen)) > 3 and seen[-1] == 240
