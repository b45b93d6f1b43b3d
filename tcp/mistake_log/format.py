"""The on-disk Mistake Log's format: a Zarr v3 group per run, one sub-group (shard) per rank.

Layout (docs/mistake_log.md is the reader's guide)::

    <root>/zarr.json                 group; attrs: format, version, d_model, topk, state_dtype
    <root>/rank00000/zarr.json       one writer per rank shard (Zarr has no multi-writer chunks)
    <root>/rank00000/manifest.json   the commit record; written last, atomically
    <root>/rank00000/{h,labels,topk_ids,topk_probs,residual}   per target token, token-major
    <root>/rank00000/x_tilde                                   per prompt row
    <root>/rank00000/{step,sample_id,loss,x_start,x_len,y_start,y_len}   per entry

Commit protocol. Arrays only grow; their shapes are capacity (grown in large blocks), not
content. `manifest.json` says how many entries, target tokens and prompt rows are committed,
plus a CRC32 digest of each array's committed rows. A commit writes the new chunks (every chunk
write is an atomic rename; the open tail chunk is rewritten whole, never read-modify-written),
fsyncs them, then replaces the manifest (temp file, fsync, rename, fsync of the directory).
Readers never look past the manifest's counts, so a crash at any point leaves the previous commit
readable; whatever was written after it is an uncommitted tail that readers ignore and report.
Every chunk also carries a CRC32C (Zarr's crc32c codec), so a corrupt chunk fails its read.

This module: the layout's names and constants, the schema, chunking and codecs, the manifest
(durable single-file writes are `tcp.runtime.atomic`). Entries <-> stored rows are `rows.py`; the
shard writer is `shard_writer.py` (it encodes and writes the chunks of plain-codec arrays itself,
byte-identical to Zarr's: `chunk_io.py`), the reader `reader.py`, rewriting a whole log
(prune, compact, merge) `tcp/log_tools/`.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import uuid
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import ArrayArrayCodec, BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore

from tcp.config import ZarrStoreConfig
from tcp.runtime.atomic import fsync_path

# BitRound (lossy option) is a numcodecs codec, not a Zarr v3 spec codec; zarr-python reads it
# (docs/mistake_log.md says so). Silence the per-array reminder, nothing else.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")

FORMAT = "tcp-mistake-log"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_ARRAYS = ("h", "labels", "topk_ids", "topk_probs", "residual")
PROMPT_ARRAYS = ("x_tilde",)
ENTRY_ARRAYS = ("step", "sample_id", "loss", "x_start", "x_len", "y_start", "y_len")
ALL_ARRAYS = TOKEN_ARRAYS + PROMPT_ARRAYS + ENTRY_ARRAYS
STATE_ARRAYS = ("h", "x_tilde")
ENTRY_CHUNK_ROWS = 4096
FSYNC_THREADS = 8
"""fsyncs a commit runs at once (TrackingStore.sync)."""
_NP_STATE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
"""bfloat16 has no NumPy dtype: its bits are stored as uint16 (attrs say so)."""


class MistakeLogCorrupt(RuntimeError):
    """A store that fails verification: never read silently."""


def rank_group(rank: int) -> str:
    """The sub-group name of a rank's shard."""
    return f"rank{rank:05d}"


# ---------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Schema:
    """Shape facts fixed when a store is created (the root group's attrs)."""

    d_model: int
    topk: int
    state_dtype: str  # "float32" | "float16" | "bfloat16"

    def dtype(self, name: str) -> str:
        """NumPy dtype of array `name` on disk."""
        if name in STATE_ARRAYS:
            return _NP_STATE[self.state_dtype]
        if name in ("labels", "topk_ids"):
            return "int32"
        if name in ("topk_probs", "residual", "loss"):
            return "float32"
        return "int64"

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Trailing shape of one row of array `name`."""
        if name in STATE_ARRAYS:
            return (self.d_model,)
        if name in ("topk_ids", "topk_probs"):
            return (self.topk,)
        return ()

    def attrs(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "d_model": self.d_model,
                "topk": self.topk, "state_dtype": self.state_dtype}

    @staticmethod
    def from_attrs(attrs: dict[str, Any], where: Path) -> Schema:
        if attrs.get("format") != FORMAT:
            raise MistakeLogCorrupt(f"{where}: not a tcp Mistake Log (attrs.format="
                                    f"{attrs.get('format')!r})")
        if attrs.get("version") != FORMAT_VERSION:
            raise MistakeLogCorrupt(f"{where}: format version {attrs.get('version')}, this tcp "
                                    f"reads {FORMAT_VERSION}")
        return Schema(int(attrs["d_model"]), int(attrs["topk"]), str(attrs["state_dtype"]))


def chunk_rows(schema: Schema, name: str, cfg: ZarrStoreConfig) -> int:
    """Rows per chunk: token arrays share the chunking of `h` (row r lives in chunk r // C of
    every token array), prompt rows follow `x_tilde`, entry arrays use a fixed small chunk."""
    if name in ENTRY_ARRAYS:
        return ENTRY_CHUNK_ROWS
    ref = "x_tilde" if name in PROMPT_ARRAYS else "h"
    row_bytes = schema.d_model * np.dtype(schema.dtype(ref)).itemsize
    return max(64, int(cfg.chunk_mib * 2**20) // row_bytes)


def write_unit(schema: Schema, name: str, cfg: ZarrStoreConfig) -> int:
    """Rows written as one piece: a chunk, or a whole shard when sharding is on."""
    return chunk_rows(schema, name, cfg) * max(1, cfg.shard_chunks)


def codecs(schema: Schema, name: str, cfg: ZarrStoreConfig) -> dict[str, Any]:
    """`create_array` keyword arguments (filters, compressors) for array `name`."""
    filters: list[ArrayArrayCodec] = []
    if cfg.lossy_keepbits is not None and name in STATE_ARRAYS:
        from zarr.codecs.numcodecs import BitRound  # only for the lossy option

        filters.append(BitRound(keepbits=cfg.lossy_keepbits))
    comp: list[BytesBytesCodec] = []
    if cfg.compressor == "zstd":
        comp.append(ZstdCodec(level=cfg.level))
    elif cfg.compressor == "blosc":
        item = np.dtype(schema.dtype(name)).itemsize
        comp.append(BloscCodec(cname="zstd", clevel=cfg.level, typesize=item,
                               shuffle="shuffle" if cfg.shuffle else "noshuffle"))
    if cfg.checksum:
        comp.append(Crc32cCodec())
    return {"filters": filters, "compressors": comp}


def codec_description(cfg: ZarrStoreConfig) -> dict[str, Any]:
    """What the manifest records about encoding (and the stated lossy bound)."""
    d: dict[str, Any] = {"compressor": cfg.compressor, "level": cfg.level,
                         "shuffle": cfg.shuffle if cfg.compressor == "blosc" else None,
                         "checksum": "crc32c" if cfg.checksum else None,
                         "shard_chunks": cfg.shard_chunks, "chunk_mib": cfg.chunk_mib,
                         "lossy_keepbits": cfg.lossy_keepbits}
    if cfg.lossy_keepbits is not None:
        d["lossy_arrays"] = list(STATE_ARRAYS)
        d["max_relative_error"] = 2.0 ** -(cfg.lossy_keepbits + 1)  # normal numbers;
        # subnormals: absolute error <= max_relative_error * smallest normal
    return d


# ---------------------------------------------------------------------- filesystem helpers
def replace_file(path: Path, parts: Iterable[Any], *, fsync: bool) -> int:
    """Write `parts` (bytes-like, in order) at `path` through a temp file `<path>.<id>.partial`
    renamed into place, so the file is the old or the new one, never partial; with `fsync` the
    data is on disk before the rename, also across a power cut (the folder is fsynced at the
    commit). Creates missing folders. Returns the bytes written."""
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:  # a new chunk's folder (c/N): created on first use only
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")
    try:
        with f:
            n = sum(f.write(part) for part in parts)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


@functools.cache
def _fsync_pool() -> ThreadPoolExecutor:
    """One pool per process, shared by every shard's commits (threads start on first use)."""
    return ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="tcp-mlog-fsync")


os.register_at_fork(after_in_child=_fsync_pool.cache_clear)  # a forked child starts its own


def fsync_all(files: Iterable[Path], dirs: Iterable[Path]) -> None:
    """fsync `files`, then `dirs`, concurrently on the shared pool (each waits on the disk, not
    the CPU); re-raises the first failure."""
    pool = _fsync_pool()
    list(pool.map(fsync_path, files))
    list(pool.map(fsync_path, dirs))


class TrackingStore(LocalStore):
    """A LocalStore that remembers what it wrote: stored bytes per key, and the keys a commit
    must fsync. (LocalStore already writes each key through a temp file and a rename.)"""

    def __init__(self, root: Path | str, *, read_only: bool = False,
                 durable: bool = False) -> None:
        """`durable`: every file Zarr writes is fsynced before it is renamed into place (see
        `set`); the shard writer sets it when `mistake_log.store.fsync` is on."""
        super().__init__(root, read_only=read_only)
        self.durable = durable
        self.sizes: dict[str, int] = {}
        self.total = 0
        """Sum of `sizes`, kept current so a commit does not re-add every key."""
        self.unsynced: set[str] = set()
        """Keys whose files the next `sync` fsyncs."""
        self.moved: set[str] = set()
        """Keys whose folders the next `sync` fsyncs (every key written since)."""
        self._linked: set[Path] = set()
        """Folders whose entry in their parent a `sync` has made durable."""

    def note_existing(self, key: str, size: int) -> None:
        """Account for a file written before this store was opened (a reopened shard)."""
        self.total += size - self.sizes.get(key, 0)
        self.sizes[key] = size

    def note_written(self, key: str, size: int, *, synced: bool = False) -> None:
        """Account for a file just written (`size` bytes): the next `sync` fsyncs it (unless
        its writer already did, `synced`) and its folders."""
        self.note_existing(key, size)
        self.moved.add(key)
        if not synced:
            self.unsynced.add(key)

    async def set(self, key: str, value: Buffer) -> None:
        """Zarr's writes (metadata; sharded, blosc and lossy arrays' chunks). LocalStore writes
        a temp file and renames it without an fsync in between, so after a power cut the rename
        may be on disk and the data not: a rewritten open chunk holding committed rows would
        come back empty. `durable` stores fsync the temp file first, as the direct chunk writes
        do (chunk_io.py), through the same `replace_file`."""
        if not self.durable:
            await super().set(key, value)
            self.note_written(key, len(value))
            return
        if self.read_only:
            raise ValueError(f"{self.root} was opened read-only; cannot write {key}")
        await asyncio.to_thread(replace_file, Path(self.root) / key, [value.to_bytes()],
                                fsync=True)
        self.note_written(key, len(value), synced=True)

    def with_read_only(self, read_only: bool = False) -> TrackingStore:
        return TrackingStore(self.root, read_only=read_only, durable=self.durable)

    def sync(self, fsync: bool) -> None:
        """fsync every file written since the last call (but those their writer fsynced before
        renaming them in: the direct chunk writes), then the folder of each (its entry for the
        file changed) and, for a folder not yet known to be durably linked into its parent,
        that parent too, up to the store root (Zarr's 2-D chunk keys `c/N/0` create a folder
        `c/N` per chunk row, whose entry lives in `c`). A folder is known once a sync has
        fsynced its parent; a store opened afresh knows none, so its first commit fsyncs every
        folder above what it wrote. Folders are never removed under a live store. The fsyncs
        of one step run concurrently (FSYNC_THREADS): each waits on the disk, not the CPU, and
        one at a time they were most of a commit's cost (~7 ms a file here)."""
        keys, self.unsynced = self.unsynced, set()
        moved, self.moved = self.moved, set()
        if not fsync or not moved:
            return
        root = Path(self.root)
        dirs: set[Path] = set()
        linked: set[Path] = set()
        for k in moved:
            d = (root / k).parent
            dirs.add(d)
            while d != root and d not in self._linked and d.is_relative_to(root):
                dirs.add(d.parent)
                linked.add(d)
                d = d.parent
        fsync_all([root / k for k in keys], dirs)
        self._linked |= linked


# ---------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """One rank's commit record."""

    rank: int
    entries: int = 0
    tokens: int = 0
    prompt_rows: int = 0
    first_step: int | None = None
    last_step: int | None = None
    commits: int = 0
    digests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALL_ARRAYS, 0))
    raw_bytes: int = 0
    stored_bytes: int = 0
    dropped_entries: int = 0
    codec: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0

    def rows(self, name: str) -> int:
        """Committed rows of array `name`."""
        if name in TOKEN_ARRAYS:
            return self.tokens
        if name in PROMPT_ARRAYS:
            return self.prompt_rows
        return self.entries

    def to_json(self) -> dict[str, Any]:
        """A snapshot (deep copy: later commits do not change it)."""
        return copy.deepcopy({"format": FORMAT, "version": FORMAT_VERSION, **self.__dict__})

    @staticmethod
    def read(path: Path) -> Manifest:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise MistakeLogCorrupt(f"{path}: unreadable manifest ({e}); the rank's shard "
                                    "cannot be trusted") from None
        if d.pop("format", None) != FORMAT or d.pop("version", None) != FORMAT_VERSION:
            raise MistakeLogCorrupt(f"{path}: not a tcp Mistake Log manifest v{FORMAT_VERSION}")
        try:
            return Manifest(**d)
        except TypeError as e:
            raise MistakeLogCorrupt(f"{path}: malformed manifest ({e})") from None


# ---------------------------------------------------------------------- conversions
def create_root(store: LocalStore | Path | str, schema: Schema) -> Any:
    """Open (creating if needed) a run's root group and check it holds this schema. In a
    distributed run rank 0 calls it before the others open their shards."""
    if not isinstance(store, LocalStore):
        store = TrackingStore(store)
    g = zarr.open_group(store=store, mode="a", zarr_format=3)
    if not g.attrs.get("format"):
        g.attrs.update(schema.attrs())
    found = Schema.from_attrs(dict(g.attrs), Path(str(store.root)))
    if found != schema:
        raise ValueError(f"{store.root}: existing Mistake Log has {found}, this run needs "
                         f"{schema}; point mistake_log.store.path elsewhere")
    return g


def ranks_in(root: Path | str) -> list[int]:
    """Ranks that have a shard in the store."""
    root = Path(root)
    return sorted(int(p.name[4:]) for p in root.glob("rank*") if p.is_dir())


async def gather_jobs(jobs: list[Any]) -> list[Any]:
    """Run Zarr coroutines concurrently (one round trip to Zarr's event loop)."""
    return list(await asyncio.gather(*jobs))
