"""The on-disk Mistake Log: a Zarr v3 group per run, one sub-group (shard) per rank.

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
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.abc.codec import ArrayArrayCodec, BytesBytesCodec
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import Buffer
from zarr.core.sync import sync as zarr_sync
from zarr.storage import LocalStore

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths, ranges_to_rows

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
        from zarr.codecs.numcodecs import BitRound

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
def fsync_path(path: Path) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any, *, fsync: bool) -> None:
    """Temp file, fsync, rename, fsync the directory: the file is old or new, never partial."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


class TrackingStore(LocalStore):
    """A LocalStore that remembers what it wrote: stored bytes per key, and the keys a commit
    must fsync. (LocalStore already writes each key through a temp file and a rename.)"""

    def __init__(self, root: Path | str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.sizes: dict[str, int] = {}
        self.total = 0
        """Sum of `sizes`, kept current so a commit does not re-add every key."""
        self.unsynced: set[str] = set()

    def note_existing(self, key: str, size: int) -> None:
        """Account for a file written before this store was opened (a reopened shard)."""
        self.total += size - self.sizes.get(key, 0)
        self.sizes[key] = size

    async def set(self, key: str, value: Buffer) -> None:
        await super().set(key, value)
        self.note_existing(key, len(value))
        self.unsynced.add(key)

    def with_read_only(self, read_only: bool = False) -> TrackingStore:
        return TrackingStore(self.root, read_only=read_only)

    def sync(self, fsync: bool) -> None:
        """fsync every file written since the last call, then their directories."""
        keys, self.unsynced = self.unsynced, set()
        if not fsync:
            return
        dirs = set()
        for k in keys:
            p = Path(self.root) / k
            fsync_path(p)
            dirs.add(p.parent)
        for d in dirs:
            fsync_path(d)


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
def batch_to_rows(batch: MistakeBatch, schema: Schema) -> dict[str, np.ndarray]:
    """MistakeBatch (CPU) -> the per-array rows to append, offsets still local (start at 0)."""
    def state(t: torch.Tensor) -> np.ndarray:
        if schema.state_dtype == "bfloat16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.to(getattr(torch, schema.state_dtype)).numpy()

    xl, yl = batch.prompt_lens, batch.target_lens
    return {
        "h": state(batch.h), "x_tilde": state(batch.x_tilde),
        "labels": batch.labels.to(torch.int32).numpy(),
        "topk_ids": batch.topk_ids.to(torch.int32).numpy(),
        "topk_probs": batch.topk_probs.float().numpy(),
        "residual": batch.residual.float().numpy(),
        "step": batch.step.long().numpy(), "sample_id": batch.sample_id.long().numpy(),
        "loss": batch.loss.float().numpy(),
        "x_start": batch.x_offsets[:-1].long().numpy(), "x_len": xl.long().numpy(),
        "y_start": batch.y_offsets[:-1].long().numpy(), "y_len": yl.long().numpy(),
    }


def state_tensor(a: np.ndarray, state_dtype: str) -> torch.Tensor:
    """On-disk state rows -> torch (bfloat16 bits are reinterpreted)."""
    if state_dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


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


# ---------------------------------------------------------------------- writer (one rank)
class RankStoreWriter:
    """The single synchronous writer of one rank's shard. `append` buffers, `commit` writes
    and publishes. The asynchronous writer (writer.py) calls these from its worker thread."""

    def __init__(self, root: Path | str, rank: int, schema: Schema, cfg: ZarrStoreConfig) -> None:
        self.root, self.rank, self.schema, self.cfg = Path(root), rank, schema, cfg
        self.dir = self.root / rank_group(rank)
        self.store = TrackingStore(self.root)
        g = create_root(self.store, schema)
        self.group = g.require_group(rank_group(rank))
        self.arrays: dict[str, Any] = {}
        for name in ALL_ARRAYS:
            if name in self.group:
                self.arrays[name] = self.group[name]
            else:
                self.arrays[name] = self.group.create_array(
                    name, shape=(0, *schema.row_shape(name)), dtype=schema.dtype(name),
                    chunks=(chunk_rows(schema, name, cfg), *schema.row_shape(name)),
                    shards=((write_unit(schema, name, cfg), *schema.row_shape(name))
                            if cfg.shard_chunks else None),
                    fill_value=-1 if name in ENTRY_ARRAYS and name != "loss" else 0,
                    **codecs(schema, name, cfg))
        # Every chunk written holds data, so skip Zarr's per-chunk "all fill value?" scan.
        self.arrays = {n: a.with_config({"write_empty_chunks": True})
                       for n, a in self.arrays.items()}
        mpath = self.dir / MANIFEST
        if mpath.exists():
            self.manifest = Manifest.read(mpath)
            if self.manifest.codec != codec_description(cfg):
                raise ValueError(
                    f"{self.dir}: this shard was written with store options "
                    f"{self.manifest.codec}; appending needs the same mistake_log.store codec and "
                    f"chunk options (got {codec_description(cfg)}), or a new store path")
        else:
            self.manifest = Manifest(rank=rank, codec=codec_description(cfg))
            self._publish()
        for key in _listdir_keys(self.root, rank_group(rank)):
            self.store.note_existing(key, (self.root / key).stat().st_size)
        self.store.unsynced.clear()
        self._tail: dict[str, np.ndarray] = {}
        self._load_tails()
        self._pending: dict[str, list[np.ndarray]] = {n: [] for n in ALL_ARRAYS}
        self._pending_rows = dict.fromkeys(ALL_ARRAYS, 0)
        self._pending_steps: list[tuple[int, int]] = []  # (first, last) step of each append
        self._pending_raw = 0
        self.last_step = self.manifest.last_step

    def _load_tails(self) -> None:
        """Read the committed rows of each array's open write unit (not yet sealed) into RAM."""
        for name in ALL_ARRAYS:
            n = self.manifest.rows(name)
            unit = write_unit(self.schema, name, self.cfg)
            start = n - n % unit
            self._tail[name] = np.asarray(self.arrays[name][start:n]) if n > start else \
                np.zeros((0, *self.schema.row_shape(name)), dtype=self.schema.dtype(name))

    def rollback(self, cursor: dict[str, Any]) -> int:
        """Forget every entry committed after `cursor` (a manifest as `to_json()` gave it at a
        checkpoint), so a resumed run logs each (step, sample) exactly once. Rows up to the
        cursor are never rewritten by later commits, so restoring the cursor's counts and
        digests is the whole truncation; the abandoned rows are overwritten by the next
        commits. Returns the number of entries forgotten. Nothing may be pending."""
        if self._pending_steps:
            raise RuntimeError("rollback() with uncommitted appends")
        snap = self.check_cursor(cursor)
        m = self.manifest
        dropped = m.entries - snap.entries
        snap.codec, snap.stored_bytes = m.codec, self.store.total
        self.manifest = snap
        self._publish()
        self._load_tails()
        self.last_step = snap.last_step
        return dropped

    def check_cursor(self, cursor: dict[str, Any]) -> Manifest:
        """The cursor as a Manifest, after checking it fits this shard (its rank, no more rows
        than committed, its last entry where it says); raises MistakeLogCorrupt otherwise.
        Reads only."""
        snap = Manifest(**copy.deepcopy({k: v for k, v in cursor.items()
                                          if k not in ("format", "version")}))
        m = self.manifest
        if snap.rank != self.rank:
            raise ValueError(f"cursor of rank {snap.rank} given to rank {self.rank}'s shard")
        if any(snap.rows(n) > m.rows(n) for n in ALL_ARRAYS):
            raise MistakeLogCorrupt(
                f"{self.dir}: the checkpoint's cursor ({snap.entries} entries) is beyond what "
                f"this shard committed ({m.entries}); the Mistake Log is not the one this "
                "checkpoint was written with (was it replaced or restored from elsewhere?)")
        if snap.entries and int(self.arrays["step"][snap.entries - 1]) != snap.last_step:
            raise MistakeLogCorrupt(f"{self.dir}: entry {snap.entries - 1} does not hold step "
                                    f"{snap.last_step} as the checkpoint recorded")
        return snap

    # -------------------------------------------------------------- appending
    def append(self, batch: MistakeBatch) -> int:
        """Buffer one batch of entries (steps must not decrease). Returns its raw bytes."""
        if batch.num_entries == 0:
            return 0
        lo, hi = self.check(batch, after=self.last_step)
        rows = batch_to_rows(batch, self.schema)
        rows["x_start"] = rows["x_start"] + self.manifest.prompt_rows + \
            self._pending_rows["x_tilde"]
        rows["y_start"] = rows["y_start"] + self.manifest.tokens + self._pending_rows["h"]
        raw = 0
        for name, a in rows.items():
            self._pending[name].append(a)
            self._pending_rows[name] += a.shape[0]
            raw += a.nbytes
        self._pending_steps.append((lo, hi))
        self.last_step = hi
        self._pending_raw += raw
        return raw

    def check(self, batch: MistakeBatch, *, after: int | None) -> tuple[int, int]:
        """Validate a batch against the schema and step order; returns its (first, last) step.
        Raises ValueError naming the mismatch."""
        steps = batch.step
        lo, hi = int(steps.min()), int(steps.max())
        if bool((steps[1:] < steps[:-1]).any()) or (after is not None and lo < after):
            raise ValueError(f"rank {self.rank}: Mistake Log steps must not decrease "
                             f"(got {lo}..{hi} after {after})")
        if batch.h.shape[-1] != self.schema.d_model or batch.topk_ids.shape[-1] != \
                self.schema.topk or batch.x_tilde.shape[-1] != self.schema.d_model:
            raise ValueError(f"entries have d={batch.h.shape[-1]}, k={batch.topk_ids.shape[-1]};"
                             f" this store holds d={self.schema.d_model}, k={self.schema.topk}")
        return lo, hi

    def commit(self) -> Manifest:
        """Write everything appended since the last commit, make it durable, publish it."""
        if not self._pending_steps:
            return self.manifest
        m = self.manifest
        jobs: list[Any] = []
        for name in ALL_ARRAYS:
            new = np.concatenate(self._pending[name]) if len(self._pending[name]) > 1 else \
                self._pending[name][0]
            m.digests[name] = zlib.crc32(np.ascontiguousarray(new).data, m.digests[name])
            jobs += self._write_rows(name, m.rows(name), new)
        zarr_sync(_gather(jobs))  # all arrays' chunks encoded and written concurrently
        self.store.sync(self.cfg.fsync)
        m.entries += self._pending_rows["step"]
        m.tokens += self._pending_rows["h"]
        m.prompt_rows += self._pending_rows["x_tilde"]
        if m.first_step is None:
            m.first_step = self._pending_steps[0][0]
        m.last_step = self._pending_steps[-1][1]
        m.raw_bytes += self._pending_raw
        m.stored_bytes = self.store.total
        m.commits += 1
        self._publish()
        self._pending = {n: [] for n in ALL_ARRAYS}
        self._pending_rows = dict.fromkeys(ALL_ARRAYS, 0)
        self._pending_steps = []
        self._pending_raw = 0
        return m

    def note_dropped(self, entries: int) -> None:
        """Count entries the asynchronous writer had to drop (recorded at the next commit)."""
        self.manifest.dropped_entries += entries

    def _write_rows(self, name: str, start: int, new: np.ndarray) -> list[Any]:
        """Plan rows [start, start + len(new)) as whole write units (chunks or shards): the
        open unit is rewritten from the in-memory tail, padded, so Zarr never reads it back.
        Grows the array if needed; returns the write coroutines (run by `commit`)."""
        unit = write_unit(self.schema, name, self.cfg)
        tail = self._tail[name]
        buf = np.concatenate([tail, new]) if tail.shape[0] else new
        base = start - tail.shape[0]
        assert base % unit == 0
        units = -(-buf.shape[0] // unit)
        arr = self.arrays[name]
        need = base + units * unit
        if need > arr.shape[0]:
            grow = max(need, 2 * arr.shape[0], 16 * unit)
            grow = -(-grow // unit) * unit
            arr.resize((grow, *arr.shape[1:]))
        full = (buf.shape[0] // unit) * unit
        jobs = []
        aa = arr.async_array
        if full:
            jobs.append(aa.setitem(slice(base, base + full), buf[:full]))
        rest = buf[full:]
        if rest.shape[0]:
            padded = np.full((unit, *rest.shape[1:]), arr.fill_value, dtype=rest.dtype)
            padded[:rest.shape[0]] = rest
            jobs.append(aa.setitem(slice(base + full, base + full + unit), padded))
        self._tail[name] = rest.copy()
        return jobs

    def _publish(self) -> None:
        self.manifest.updated = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / MANIFEST, self.manifest.to_json(), fsync=self.cfg.fsync)


def _listdir_keys(root: Path, prefix: str) -> list[str]:
    base = root / prefix
    out = []
    for dirpath, _, files in os.walk(base):
        for f in files:
            if f != MANIFEST and not f.endswith(".partial") and not f.endswith(".tmp"):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


# ---------------------------------------------------------------------- reader (one rank)
class RankStoreReader:
    """Reads one rank's committed entries. `refresh()` picks up newer commits."""

    def __init__(self, root: Path | str, rank: int, *, cache_mib: float = 256.0) -> None:
        """`cache_mib` bounds the decoded-chunk cache (memory independent of the log's size)."""
        self.root, self.rank = Path(root), rank
        self.cache_bytes = int(cache_mib * 2**20)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self.dir = self.root / rank_group(rank)
        if not (self.root / "zarr.json").exists():
            raise FileNotFoundError(f"{self.root}: no Mistake Log here (no zarr.json)")
        g = zarr.open_group(self.root, mode="r", zarr_format=3)
        self.schema = Schema.from_attrs(dict(g.attrs), self.root)
        self.manifest = Manifest(rank=rank)
        self.arrays: dict[str, Any] = {}
        self.refresh()

    def reset(self) -> Manifest:
        """Forget cached chunks and re-read the manifest, also when it went backwards (after
        the writer's `rollback` on resume)."""
        self._cache.clear()
        self._cache_bytes = 0
        self.manifest = Manifest(rank=self.rank)
        return self.refresh()

    def refresh(self) -> Manifest:
        """Re-read the manifest (and array metadata when capacity grew)."""
        mpath = self.dir / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{self.dir}: rank {self.rank} has no manifest.json")
        m = Manifest.read(mpath)
        if m.entries < self.manifest.entries:
            raise MistakeLogCorrupt(f"{mpath}: committed entries went backwards "
                                    f"({self.manifest.entries} -> {m.entries})")
        self.manifest = m
        if not self.arrays or any(self.arrays[n].shape[0] < m.rows(n) for n in ALL_ARRAYS):
            g = zarr.open_group(self.root / rank_group(self.rank), mode="r", zarr_format=3)
            self.arrays = {n: g[n] for n in ALL_ARRAYS}
            for n in ALL_ARRAYS:
                if self.arrays[n].shape[0] < m.rows(n):
                    raise MistakeLogCorrupt(f"{self.dir}/{n}: {self.arrays[n].shape[0]} rows "
                                            f"on disk, manifest commits {m.rows(n)}")
        return m

    @property
    def num_entries(self) -> int:
        return self.manifest.entries

    # -------------------------------------------------------------- step index
    def _step_chunk(self, ci: int) -> np.ndarray:
        """Committed `step` values of entry chunk ci (through the reader's chunk cache)."""
        lo = ci * ENTRY_CHUNK_ROWS
        hi = min(lo + ENTRY_CHUNK_ROWS, self.manifest.entries)
        return self._rows({"step": np.arange(lo, hi, dtype=np.int64)})["step"]

    def first_entry_at_or_after(self, step: int) -> int:
        """Index of the first committed entry with entry.step >= step (steps are sorted)."""
        n = self.manifest.entries
        if n == 0:
            return 0
        lo_c, hi_c = 0, (n - 1) // ENTRY_CHUNK_ROWS
        while lo_c < hi_c:  # first chunk whose last step >= step
            mid = (lo_c + hi_c) // 2
            if self._step_chunk(mid)[-1] >= step:
                hi_c = mid
            else:
                lo_c = mid + 1
        ch = self._step_chunk(lo_c)
        return lo_c * ENTRY_CHUNK_ROWS + int(np.searchsorted(ch, step, side="left"))

    def entry_range(self, lo_step: int, hi_step: int) -> tuple[int, int]:
        """Committed entries with lo_step <= step < hi_step, as [first, last)."""
        return self.first_entry_at_or_after(lo_step), self.first_entry_at_or_after(hi_step)

    # -------------------------------------------------------------- reading
    def read(self, idx: np.ndarray | list[int]) -> MistakeBatch:
        """The entries with these indices (each < committed entries), in the given order."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.manifest.entries):
            raise IndexError(f"rank {self.rank}: entry index out of committed range "
                             f"[0, {self.manifest.entries})")
        meta = self._rows(dict.fromkeys(ENTRY_ARRAYS, idx))
        y_rows = ranges_to_rows(meta["y_start"], meta["y_len"])
        x_rows = ranges_to_rows(meta["x_start"], meta["x_len"])
        tok = self._rows({**dict.fromkeys(TOKEN_ARRAYS, y_rows), "x_tilde": x_rows})
        sd = self.schema.state_dtype
        return MistakeBatch(
            x_tilde=state_tensor(tok["x_tilde"], sd),
            x_offsets=offsets_from_lengths(torch.from_numpy(meta["x_len"])),
            h=state_tensor(tok["h"], sd),
            y_offsets=offsets_from_lengths(torch.from_numpy(meta["y_len"])),
            labels=torch.from_numpy(tok["labels"]).long(),
            topk_ids=torch.from_numpy(tok["topk_ids"]).long(),
            topk_probs=torch.from_numpy(tok["topk_probs"]),
            residual=torch.from_numpy(tok["residual"]),
            step=torch.from_numpy(meta["step"]),
            sample_id=torch.from_numpy(meta["sample_id"]),
            rank=torch.full((idx.size,), self.rank, dtype=torch.long),
            loss=torch.from_numpy(meta["loss"]),
        )

    def _rows(self, requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of several arrays. Whole chunks are read (all missing ones concurrently, in one
        round trip to Zarr's event loop) and kept in an LRU of decoded chunks bounded by
        `cache_mib`. A chunk's committed rows never change, so a cached chunk serves every
        row it holds; the open tail chunk is re-read only for rows committed since."""
        plan: dict[str, tuple[int, np.ndarray]] = {}
        keys: list[tuple[str, int]] = []
        jobs: list[Any] = []
        # Every chunk this call uses is held here until it returns: the fetches below may evict
        # a cache hit from the LRU (a cache smaller than one call's chunks is slow, not wrong).
        held: dict[tuple[str, int], np.ndarray] = {}
        for name, rows in requests.items():
            arr, c = self.arrays[name], int(self.arrays[name].chunks[0])
            which = rows // c
            plan[name] = (c, which)
            n = self.manifest.rows(name)
            for ci in np.unique(which).tolist():
                cached = self._cache.get((name, ci))
                need = int(rows[which == ci].max()) - ci * c
                if cached is None or cached.shape[0] <= need:
                    jobs.append(arr.async_array.getitem(slice(ci * c, min((ci + 1) * c, n))))
                    keys.append((name, ci))
                else:
                    held[(name, ci)] = cached
                    self._cache.move_to_end((name, ci))
        for key, res in zip(keys, zarr_sync(_gather(jobs)), strict=True):
            held[key] = np.asarray(res)
            self._cache_put(key, held[key])
        out = {}
        for name, rows in requests.items():
            c, which = plan[name]
            arr = self.arrays[name]
            res = np.empty((rows.size, *arr.shape[1:]), dtype=arr.dtype)
            for ci in np.unique(which).tolist():
                sel = which == ci
                res[sel] = held[(name, ci)][rows[sel] - ci * c]
            out[name] = res
        return out

    def _cache_put(self, key: tuple[str, int], chunk: np.ndarray) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= old.nbytes
        self._cache[key] = chunk
        self._cache_bytes += chunk.nbytes
        while self._cache_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    def read_range(self, first: int, last: int) -> MistakeBatch:
        """Entries [first, last)."""
        return self.read(np.arange(first, last, dtype=np.int64))


async def _gather(jobs: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*jobs))


def ranks_in(root: Path | str) -> list[int]:
    """Ranks that have a shard in the store."""
    root = Path(root)
    return sorted(int(p.name[4:]) for p in root.glob("rank*") if p.is_dir())
