"""`RankStoreWriter`: the single synchronous writer of one rank's shard (append, commit,
rollback to a checkpoint's cursor). The commit protocol is described in `format.py`; the
asynchronous writer that drives it from a background thread is `async_writer.py`."""

from __future__ import annotations

import copy
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from zarr.core.sync import sync as zarr_sync

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.chunk_io import ChunkWrites, DirectArray, has_crc32c, unit_key
from tcp.mistake_log.format import (
    ALL_ARRAYS,
    ENTRY_ARRAYS,
    MANIFEST,
    Manifest,
    MistakeLogCorrupt,
    Schema,
    TrackingStore,
    chunk_rows,
    codec_description,
    codecs,
    create_root,
    gather_jobs,
    rank_group,
    write_unit,
)
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.rows import batch_to_rows
from tcp.runtime.atomic import atomic_write_json


class RankStoreWriter:
    """The single synchronous writer of one rank's shard. `append` buffers, `commit` writes
    and publishes. The asynchronous writer (async_writer.py) calls these from its worker thread."""

    direct_chunks = True
    """Write the chunks of plain-codec arrays ourselves (chunk_io.py); False: all via Zarr."""

    def __init__(self, root: Path | str, rank: int, schema: Schema, cfg: ZarrStoreConfig) -> None:
        self.root, self.rank, self.schema, self.cfg = Path(root), rank, schema, cfg
        self.dir = self.root / rank_group(rank)
        self.store = TrackingStore(self.root, durable=cfg.fsync)
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
        self._direct = {n: DirectArray.of(a) if self.direct_chunks and not cfg.shard_chunks
                        else None for n, a in self.arrays.items()}
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
        # What opening wrote (a new shard's array metadata) is fsynced by the first commit.
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
        # Chunks are encoded and written concurrently: ours (chunk_io.py) in a thread pool as
        # soon as planned, Zarr's (sharded, blosc, filtered arrays) on its event loop.
        writes = ChunkWrites(self.store, fsync=self.cfg.fsync)
        new_rows: dict[str, np.ndarray] = {}
        try:
            for name in ALL_ARRAYS:
                tail, pending = self._tail[name], self._pending[name]
                # The open unit's tail and the new rows in one buffer (one copy).
                buf = np.concatenate([tail, *pending]) if tail.shape[0] or len(pending) > 1 \
                    else np.ascontiguousarray(pending[0])
                new_rows[name] = buf[tail.shape[0]:]
                da = self._direct[name]
                for rows0, rows in self._write_rows(name, m.rows(name), buf):
                    if da is not None:
                        writes.add(da.jobs(rows0, rows))
                    else:
                        jobs.append(self.arrays[name].async_array.setitem(
                            slice(rows0, rows0 + rows.shape[0]), rows))
            if jobs:
                zarr_sync(gather_jobs(jobs))
            # While the pool encodes (zlib releases the GIL on large buffers).
            digests = {n: zlib.crc32(r.data, m.digests[n]) for n, r in new_rows.items()}
        finally:
            writes.finish()
        m.digests.update(digests)
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

    def same_layout(self, src: Any) -> bool:
        """Whether the shard `src` (a `RankStoreReader`) stores its rows in files this shard
        would write identically: same options, chunk grids, codecs and chunk key encoding."""
        if src.manifest.codec != self.manifest.codec or src.schema != self.schema:
            return False
        for name, arr in self.arrays.items():
            a, b = src.arrays[name].metadata, arr.metadata
            if (a.chunk_grid, a.codecs, a.chunk_key_encoding, a.dtype) != \
                    (b.chunk_grid, b.codecs, b.chunk_key_encoding, b.dtype):
                return False
        return True

    def copy_from(self, src: Any) -> bool:
        """Fill this new, empty shard with every committed row of `src` (a `RankStoreReader`
        of a shard written with the same store options): the files of its sealed write units
        are copied byte for byte (no decoding, no encoding), the open unit's committed rows are
        re-encoded and read back, and the manifest carries `src`'s counts and digests. Returns
        True when every copied byte was checked (each file's CRC32C on reading, and its copy
        read back equal); False when the options carry no per-file CRC32C (sharded or checksum
        off), so only a decoding `verify` can vouch for the copy."""
        sm, m = src.manifest, self.manifest
        if m.entries or self._pending_steps:
            raise RuntimeError("copy_from() needs a new, empty shard")
        if not self.same_layout(src):
            raise ValueError(f"{src.dir} was written with other store options ({sm.codec}) "
                             f"than this shard's ({m.codec}): copy its entries instead")
        writes = ChunkWrites(self.store, fsync=self.cfg.fsync)
        tails: dict[str, tuple[int, np.ndarray]] = {}
        checked = True
        try:
            for name in ALL_ARRAYS:
                n, unit = sm.rows(name), write_unit(self.schema, name, self.cfg)
                sealed = n - n % unit
                arr = self.arrays[name]
                if n > arr.shape[0]:
                    arr.resize((-(-n // unit) * unit, *arr.shape[1:]))
                crc = has_crc32c(arr)
                checked = checked and crc
                writes.add_copies([(src.dir / unit_key(src.arrays[name], u), unit_key(arr, u))
                                   for u in range(sealed // unit)], crc32c=crc)
                self._tail[name] = self._tail[name][:0]
                tails[name] = (sealed, np.asarray(src.arrays[name][sealed:n]))
                da = self._direct[name]
                for rows0, block in self._write_rows(name, sealed, tails[name][1]):
                    if da is not None:
                        writes.add(da.jobs(rows0, block))
                    else:
                        arr[rows0:rows0 + block.shape[0]] = block
        finally:
            writes.finish()
        for name, (lo, rows) in tails.items():  # the re-encoded rows read back equal
            if not np.array_equal(np.asarray(self.arrays[name][lo:lo + rows.shape[0]]), rows):
                raise MistakeLogCorrupt(f"{self.dir}/{name}: rows {lo}.. re-encoded from "
                                        f"{src.dir} read back different")
        self.store.sync(self.cfg.fsync)
        copied = Manifest(**{k: copy.deepcopy(v) for k, v in vars(sm).items()})
        copied.rank, copied.codec, copied.stored_bytes = self.rank, m.codec, self.store.total
        self.manifest = copied
        self.last_step = copied.last_step
        self._publish()
        return checked

    def note_dropped(self, entries: int) -> None:
        """Count entries the asynchronous writer had to drop (recorded at the next commit)."""
        self.manifest.dropped_entries += entries

    def _write_rows(self, name: str, start: int, buf: np.ndarray) -> list[tuple[int, Any]]:
        """Plan the open unit's in-memory tail followed by new rows [start, ...) (together
        `buf`) as whole write units (chunks or shards): the open unit is rewritten whole,
        padded, so it is never read back. Grows the array if needed; returns the (first row,
        rows) blocks for `commit` to write."""
        unit = write_unit(self.schema, name, self.cfg)
        base = start - self._tail[name].shape[0]
        assert base % unit == 0
        units = -(-buf.shape[0] // unit)
        arr = self.arrays[name]
        need = base + units * unit
        if need > arr.shape[0]:
            grow = max(need, 2 * arr.shape[0], 16 * unit)
            grow = -(-grow // unit) * unit
            arr.resize((grow, *arr.shape[1:]))
        full = (buf.shape[0] // unit) * unit
        jobs: list[tuple[int, Any]] = []
        if full:
            jobs.append((base, buf[:full]))
        rest = buf[full:]
        if rest.shape[0]:
            padded = np.full((unit, *rest.shape[1:]), arr.fill_value, dtype=rest.dtype)
            padded[:rest.shape[0]] = rest
            jobs.append((base + full, padded))
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
