"""Direct chunk I/O: whole-chunk writes, reads and verbatim copies without Zarr's codec pipeline.

`RankStoreWriter` only ever writes whole chunks (the open tail chunk is rewritten whole from
RAM, never read back), so for the plain codec chains it encodes them itself: bytes
(little-endian) -> zstd (numcodecs' `Zstd`, the very codec Zarr's `ZstdCodec` calls, same
level and checksum flag) -> crc32c (CRC32C appended as 4 little-endian bytes, as Zarr's
`Crc32cCodec` does), in any subset of that order. The files are byte-identical to the ones
Zarr's `setitem` writes (tests/unit/test_chunk_io.py checks every chain handled) and land at
the key Zarr uses, through a temp file and a rename, from a small thread pool (zstd releases
the GIL). Per chunk this skips Zarr's asyncio tasks, thread hand-offs and buffer copies, which
were most of the writer's time. The reader (`RankStoreReader`) reads chunks the same way
(`DirectArray.read`: CRC32C, then zstd, on a pool of its own), which keeps the replay sampler's
Python work, and so its hold on the GIL against the trainer, small. `ChunkWrites.add_copies`
copies stored files unchanged (compact, merge). Sharded arrays, filters (BitRound) and blosc
stay on Zarr's path: `DirectArray.of` returns None for them.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.metadata.v3 import ArrayV3Metadata

from tcp.mistake_log.format import replace_file

WRITE_THREADS = 4
"""Chunks encoded and written at once (a commit's chunks of all arrays share the pool)."""
READ_THREADS = 2
"""Chunks read and decoded at once (zstd releases the GIL)."""


class StoredFileCorrupt(ValueError):
    """A stored chunk file fails its CRC32C, or its copy differs from it."""


def check_crc32c(data: bytes, where: Path | str) -> None:
    """Raise StoredFileCorrupt unless `data` ends in the CRC32C of the rest (Zarr's crc32c
    codec: 4 bytes, little-endian)."""
    if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise StoredFileCorrupt(f"{where}: stored chunk fails its CRC32C")


@dataclass(frozen=True)
class DirectArray:
    """What it takes to write whole chunks of one (non-sharded, unfiltered) Zarr v3 array."""

    prefix: str
    """Store key of the array ('' for an array at the store root); chunk keys go under it."""
    chunk_key: Callable[[tuple[int, ...]], str]
    ndim: int
    dtype: np.dtype
    rows: int
    """Rows per chunk (chunks span the whole trailing shape)."""
    zstd: Zstd | None
    crc32c: bool
    row_shape: tuple[int, ...] = ()
    """Trailing shape of one row."""
    fill_value: Any = 0
    """What a chunk that was never written holds (Zarr's rule)."""

    @staticmethod
    def of(arr: Any) -> DirectArray | None:
        """The direct writer of a `zarr.Array`, or None where Zarr's path must write it."""
        meta = arr.metadata
        if not isinstance(meta, ArrayV3Metadata) or sys.byteorder != "little":
            return None
        chunks = tuple(getattr(meta.chunk_grid, "chunk_shape", ()))
        if not chunks or chunks[1:] != tuple(arr.shape[1:]):
            return None  # a regular grid whose chunks span whole rows only
        first, *rest = meta.codecs
        if not isinstance(first, BytesCodec) or (
                first.endian is not None and first.endian.value != "little"):
            return None
        zstd = None
        if rest and isinstance(rest[0], ZstdCodec):
            zstd = Zstd(level=rest[0].level, checksum=rest[0].checksum)
            rest = rest[1:]
        crc = bool(rest) and isinstance(rest[0], Crc32cCodec)
        if rest[int(crc):]:
            return None  # blosc, sharding, filters, other orders: Zarr's path
        return DirectArray(arr.path, meta.encode_chunk_key, len(meta.shape),
                           np.dtype(arr.dtype), chunks[0], zstd, crc, tuple(chunks[1:]),
                           arr.fill_value)

    def key(self, chunk: int) -> str:
        """Store key of chunk `chunk` (its row block)."""
        ck = self.chunk_key((chunk,) + (0,) * (self.ndim - 1))
        return f"{self.prefix}/{ck}" if self.prefix else ck

    def encode(self, chunk: np.ndarray) -> tuple[Any, bytes]:
        """One chunk's stored bytes as Zarr's codec chain produces them: (payload, trailer),
        the trailer being the CRC32C (4 bytes, little-endian) or empty."""
        data: Any = np.ascontiguousarray(chunk, dtype=self.dtype).view(np.uint8).reshape(-1)
        if self.zstd is not None:
            data = self.zstd.encode(data)
        crc = google_crc32c.value(data).to_bytes(4, "little") if self.crc32c else b""
        return data, crc

    def decode(self, data: bytes, where: Path | str = "") -> np.ndarray:
        """A stored chunk's rows (the inverse of `encode`): CRC32C checked, then decoded."""
        if self.crc32c:
            check_crc32c(data, where)
            data = data[:-4]
        try:
            raw: Any = self.zstd.decode(data) if self.zstd is not None else data
        except RuntimeError as e:  # numcodecs' error for a damaged zstd frame
            raise StoredFileCorrupt(f"{where}: stored chunk does not decode ({e})") from None
        out = np.frombuffer(raw, dtype=self.dtype)
        if out.size != self.rows * int(np.prod(self.row_shape, dtype=np.int64)):
            raise StoredFileCorrupt(f"{where}: chunk decodes to {out.size} values, not "
                                    f"{self.rows} rows of {self.row_shape}")
        return out.reshape(self.rows, *self.row_shape)

    def read(self, root: Path, chunk: int) -> np.ndarray:
        """Chunk `chunk` of the array in the store at `root` (a chunk never written: the fill
        value, as Zarr reads it)."""
        path = root / self.key(chunk)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return np.full((self.rows, *self.row_shape), self.fill_value, dtype=self.dtype)
        return self.decode(data, path)

    def jobs(self, first_row: int, rows: np.ndarray) -> list[tuple[DirectArray, str, np.ndarray]]:
        """Split rows [first_row, first_row + len(rows)) (whole chunks) into chunk writes."""
        assert first_row % self.rows == 0 and rows.shape[0] % self.rows == 0
        c0 = first_row // self.rows
        return [(self, self.key(c0 + i), rows[i * self.rows:(i + 1) * self.rows])
                for i in range(rows.shape[0] // self.rows)]


def unit_key(arr: Any, unit: int) -> str:
    """Store key of write unit `unit` (row block) of `arr`: a chunk, or a shard when sharded
    (a sharded array's grid is its shard grid)."""
    meta = arr.metadata
    ck = meta.encode_chunk_key((unit,) + (0,) * (len(meta.shape) - 1))
    return f"{arr.path}/{ck}" if arr.path else ck


def has_crc32c(arr: Any) -> bool:
    """Whether each stored file of `arr` ends in the CRC32C of the rest (a plain, unsharded
    array whose last codec is crc32c)."""
    meta = arr.metadata
    return isinstance(meta, ArrayV3Metadata) and bool(meta.codecs) and \
        isinstance(meta.codecs[-1], Crc32cCodec)


def _copy_one(src: Path, root: Path, key: str, crc32c: bool, fsync: bool) -> int:
    """Copy the stored file `src` to `key` under `root`, byte for byte (no decoding). With
    `crc32c` the bytes read must match their CRC32C trailer. The copy is read back and
    compared. Returns its size."""
    data = src.read_bytes()
    if crc32c:
        check_crc32c(data, src)
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if path.read_bytes() != data:
        raise StoredFileCorrupt(f"{path}: the copy of {src} reads back different")
    return len(data)


def _write_one(root: Path, job: tuple[DirectArray, str, np.ndarray], fsync: bool) -> int:
    """Encode one chunk and write it at its key via temp file + rename (as LocalStore does).
    With `fsync` the data is on disk before the rename: the open tail chunk replaces a file
    that also holds rows the previous commit published, so the rename must never reach the
    disk ahead of the new file's data (a power cut would leave an empty chunk there)."""
    da, key, rows = job
    return replace_file(root / key, da.encode(rows), fsync=fsync)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One pool per process, shared by every shard's commits (threads start on first use)."""
    return ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="tcp-mlog-chunks")


@functools.cache
def read_pool() -> ThreadPoolExecutor:
    """Chunk reads and decodes (readers', apart from the writer's pool so that neither waits
    behind the other's queue)."""
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tcp-mlog-read")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child starts its own pool
os.register_at_fork(after_in_child=read_pool.cache_clear)


class ChunkWrites:
    """One commit's direct chunk writes (or verbatim copies): each starts when added;
    `finish` waits for all of them, then accounts for them in the TrackingStore as its `set`
    would (sizes, keys to fsync) and raises the first failure. With `fsync` each file's data is
    fsynced before its rename; the commit's `TrackingStore.sync` then fsyncs the folders."""

    def __init__(self, store: Any, *, fsync: bool) -> None:
        self.store, self.root, self.fsync = store, Path(store.root), fsync
        self._started: list[tuple[str, Future[int]]] = []

    def add(self, jobs: list[tuple[DirectArray, str, np.ndarray]]) -> None:
        pool = _pool()
        self._started += [(j[1], pool.submit(_write_one, self.root, j, self.fsync))
                          for j in jobs]

    def add_copies(self, copies: list[tuple[Path, str]], *, crc32c: bool) -> None:
        """Copy stored files unchanged: each (source file, key in this store) (`_copy_one`)."""
        pool = _pool()
        self._started += [(k, pool.submit(_copy_one, src, self.root, k, crc32c, self.fsync))
                          for src, k in copies]

    def finish(self) -> None:
        started, self._started = self._started, []
        wait([f for _, f in started])
        errors = [e for _, f in started if (e := f.exception()) is not None]
        for key, fut in started:
            if fut.exception() is None:
                self.store.note_written(key, fut.result(), synced=self.fsync)
        if errors:
            raise errors[0]
