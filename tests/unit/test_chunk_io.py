"""Direct chunk writes (chunk_io.py): byte-identical to Zarr's own writes, readable by Zarr."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.chunk_io import ChunkWrites, DirectArray, StoredFileCorrupt
from tcp.mistake_log.format import Schema, TrackingStore
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.shard_writer import RankStoreWriter
from tests.helpers import fake_entries

SMALL = 64 * 16 * 4 / 2**20  # 64-row chunks at d=16 float32

CHAINS = {  # every bytes -> bytes chain the direct path handles
    "zstd3+crc": [ZstdCodec(level=3), Crc32cCodec()],
    "zstd3": [ZstdCodec(level=3)],
    "zstd1-framecrc+crc": [ZstdCodec(level=1, checksum=True), Crc32cCodec()],
    "zstd9": [ZstdCodec(level=9)],
    "crc": [Crc32cCodec()],
    "none": [],
}
DTYPES = ["float32", "float16", "uint16", "int32", "int64"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def _data(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":  # realistic floats: some zeros, some repeats
        a = rng.standard_normal(shape).astype(dtype)
        a[rng.random(shape) < 0.3] = 0
        return a
    return rng.integers(-1000 if dtype != "uint16" else 0, 1000, shape).astype(dtype)


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", [(), (16,)])
def test_chunks_byte_identical_to_zarr_setitem(tmp_path, chain, dtype, row):
    rows, nchunks = 64, 5
    data = _data(dtype, (rows * nchunks, *row), seed=len(chain) + len(dtype))
    arrays = {}
    for side in ("zarr", "direct"):
        store = TrackingStore(tmp_path / side)
        g = zarr.open_group(store=store, mode="w", zarr_format=3).require_group("rank00000")
        arrays[side] = (store, g.create_array(
            "a", shape=data.shape, dtype=dtype, chunks=(rows, *row), fill_value=0,
            compressors=CHAINS[chain], config={"write_empty_chunks": True}))
    zstore, za = arrays["zarr"]
    za[:] = data
    dstore, darr = arrays["direct"]
    da = DirectArray.of(darr)
    assert da is not None
    w = ChunkWrites(dstore, fsync=True)
    w.add(da.jobs(0, data[:rows * 2]))
    w.add(da.jobs(rows * 2, data[rows * 2:]))
    w.finish()
    zf, df = _files(tmp_path / "zarr"), _files(tmp_path / "direct")
    assert sorted(zf) == sorted(df)
    assert sum(k.startswith("rank00000/a/c/") for k in df) == nchunks
    for k in zf:
        assert zf[k] == df[k], k
    # Accounting as TrackingStore.set does it (sizes, total, keys to fsync).
    chunk_keys = {k for k in df if "/c/" in k}
    assert chunk_keys <= dstore.moved  # their folders are fsynced by the next sync
    assert not chunk_keys & dstore.unsynced  # the files were fsynced before their rename
    assert {k: dstore.sizes[k] for k in chunk_keys} == {k: zstore.sizes[k] for k in chunk_keys}
    assert not list((tmp_path / "direct").rglob("*.partial"))
    got = zarr.open_array(tmp_path / "direct" / "rank00000" / "a", mode="r")[:]
    np.testing.assert_array_equal(got, data)


def test_zarr_path_kept_for_other_codecs(tmp_path):
    schema = Schema(16, 3, "float32")
    for cfg in (ZarrStoreConfig(chunk_mib=SMALL, compressor="blosc"),
                ZarrStoreConfig(chunk_mib=SMALL, shard_chunks=4)):
        w = RankStoreWriter(tmp_path / cfg.compressor / str(cfg.shard_chunks), 0, schema, cfg)
        assert not any(w._direct.values())
    w = RankStoreWriter(tmp_path / "lossy", 0, schema,
                        ZarrStoreConfig(chunk_mib=SMALL, lossy_keepbits=8))
    assert w._direct["h"] is None and w._direct["x_tilde"] is None
    assert w._direct["labels"] is not None  # integer arrays have no filter: direct


CFGS = {
    "zstd": ZarrStoreConfig(chunk_mib=SMALL),
    "zstd-nochecksum": ZarrStoreConfig(chunk_mib=SMALL, checksum=False),
    "zstd9": ZarrStoreConfig(chunk_mib=SMALL, level=9),
    "none": ZarrStoreConfig(chunk_mib=SMALL, compressor="none"),
    "none-nochecksum": ZarrStoreConfig(chunk_mib=SMALL, compressor="none", checksum=False),
    "lossy (mixed)": ZarrStoreConfig(chunk_mib=SMALL, lossy_keepbits=8),
}


@pytest.mark.parametrize("name", sorted(CFGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_writer_store_identical_either_path(tmp_path, monkeypatch, name, dtype):
    """The whole shard (every chunk file, the stored bytes) is the same written directly or
    through Zarr, with tails rewritten across commits and a reopen in between."""
    if dtype == "bfloat16" and CFGS[name].lossy_keepbits is not None:
        pytest.skip("no lossy option for bfloat16")
    manifests = {}
    for direct in (False, True):
        monkeypatch.setattr(RankStoreWriter, "direct_chunks", direct)
        root = tmp_path / str(direct)
        for part in (range(0, 17), range(17, 40)):  # reopen: tails loaded from disk
            w = RankStoreWriter(root, 0, Schema(16, 3, dtype), CFGS[name])
            for i, s in enumerate(part):
                w.append(fake_entries(s))
                if i % 3 == 2:
                    w.commit()
            w.commit()
        manifests[direct] = w.manifest
    a, b = _files(tmp_path / "False"), _files(tmp_path / "True")
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    for k in ("entries", "tokens", "prompt_rows", "digests", "raw_bytes", "stored_bytes"):
        assert getattr(manifests[True], k) == getattr(manifests[False], k), k
    rd = RankStoreReader(tmp_path / "True", 0)
    assert rd.num_entries == 4 * 40
    g = zarr.open_group(tmp_path / "True", mode="r")["rank00000"]
    np.testing.assert_array_equal(g["step"][:160], rd.read_range(0, 160).step.numpy())


@pytest.mark.parametrize("name", sorted(CFGS))
def test_reader_direct_path_reads_what_zarr_reads(tmp_path, monkeypatch, name):
    """RankStoreReader decodes plain-codec chunks itself: every entry equals the read through
    Zarr, the open tail chunk included, also while the writer keeps committing."""
    root = tmp_path / "log"
    w = RankStoreWriter(root, 0, Schema(16, 3, "float32"), CFGS[name])
    readers = {}
    for direct in (True, False):
        rd = RankStoreReader(root, 0, cache_mib=0.01)  # tiny cache: most reads are fetches
        if not direct:
            rd._direct = dict.fromkeys(rd._direct)  # type: ignore[assignment]
        readers[direct] = rd
    assert any(readers[True]._direct.values()) or CFGS[name].lossy_keepbits is not None
    for s in range(30):
        w.append(fake_entries(s))
        w.commit()
        if s % 7 == 6:
            for rd in readers.values():
                rd.refresh()
            idx = np.arange(readers[True].num_entries)
            a, b = readers[True].read(idx), readers[False].read(idx)
            for f in ("x_tilde", "h", "labels", "topk_ids", "topk_probs", "residual", "step",
                      "sample_id", "loss", "x_offsets", "y_offsets"):
                assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_direct_read_detects_damage_and_fills_missing_chunks(tmp_path):
    root = tmp_path / "log"
    w = RankStoreWriter(root, 0, Schema(16, 3, "float32"), ZarrStoreConfig(chunk_mib=SMALL))
    for s in range(12):
        w.append(fake_entries(s))
    w.commit()
    rd = RankStoreReader(root, 0)
    da = rd._direct["h"]
    assert da is not None
    np.testing.assert_array_equal(da.read(rd.dir, 0), np.asarray(rd.arrays["h"][:da.rows]))
    missing = da.read(rd.dir, 10_000)  # never written: the fill value, as Zarr reads it
    assert missing.shape == (da.rows, 16) and (missing == rd.arrays["h"].fill_value).all()
    chunk = rd.dir / da.key(0)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoredFileCorrupt, match="CRC32C"):
        da.read(rd.dir, 0)
    with pytest.raises(ValueError):  # what readers of a damaged log catch
        RankStoreReader(root, 0, cache_mib=0).read(np.arange(4))


@pytest.mark.parametrize("fsync", [True, False])
def test_zarr_path_fsyncs_each_file_before_renaming_it_in(tmp_path, monkeypatch, fsync):
    """Blosc (Zarr's own write path): with fsync on, every file renamed into place was fsynced
    first (a power cut cannot leave a renamed-in empty chunk where committed rows were)."""
    synced: set[str] = set()
    renamed: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync_(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace_(src, dst):
        renamed.append((str(dst), os.path.realpath(src) in synced))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync_)
    monkeypatch.setattr(os, "replace", replace_)
    cfg = ZarrStoreConfig(chunk_mib=SMALL, compressor="blosc", fsync=fsync)
    w = RankStoreWriter(tmp_path, 0, Schema(16, 3, "float32"), cfg)
    for s in range(6):
        w.append(fake_entries(s))
        w.commit()  # the open chunk of every array is rewritten, committed rows and all
    chunks = [(d, ok) for d, ok in renamed if "/c/" in d]
    assert len(chunks) >= 6 * 13
    assert all(ok for _, ok in chunks) if fsync else not any(ok for _, ok in chunks)
    np.testing.assert_array_equal(RankStoreReader(tmp_path, 0).read_range(0, 24).step.numpy(),
                                  np.repeat(np.arange(6), 4))
