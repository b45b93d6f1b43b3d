"""`RankStoreReader`: reads one rank's committed entries (never past the manifest), through
an LRU of decoded chunks; the step index that the replay sampler (`sampler.py`) uses."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from tcp.mistake_log.chunk_io import DirectArray, read_pool
from tcp.mistake_log.format import (
    ALL_ARRAYS,
    ENTRY_ARRAYS,
    ENTRY_CHUNK_ROWS,
    MANIFEST,
    TOKEN_ARRAYS,
    Manifest,
    MistakeLogCorrupt,
    Schema,
    gather_jobs,
    rank_group,
)
from tcp.mistake_log.record import MistakeBatch, ranges_to_rows
from tcp.mistake_log.rows import rows_to_batch


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
        self._direct: dict[str, DirectArray | None] = {}
        """Arrays whose chunks are read and decoded here (chunk_io.py), not through Zarr."""
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
            self._direct = {n: DirectArray.of(a) for n, a in self.arrays.items()}
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
        return rows_to_batch({**meta, **tok}, self.schema, self.rank)

    def _rows(self, requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of several arrays. Whole chunks are read, all missing ones concurrently (plain
        codecs: read and decoded on a small thread pool, chunk_io.py; others: in one round trip
        to Zarr's event loop), and kept in an LRU of decoded chunks bounded by
        `cache_mib`. A chunk's committed rows never change, so a cached chunk serves every
        row it holds; the open tail chunk is re-read only for rows committed since."""
        plan: dict[str, tuple[int, np.ndarray]] = {}
        keys: list[tuple[str, int]] = []
        jobs: list[Any] = []
        # Every chunk this call uses is held here until it returns: the fetches below may evict
        # a cache hit from the LRU (a cache smaller than one call's chunks is slow, not wrong).
        held: dict[tuple[str, int], np.ndarray] = {}
        direct: list[tuple[tuple[str, int], Future[np.ndarray]]] = []
        for name, rows in requests.items():
            arr, c = self.arrays[name], int(self.arrays[name].chunks[0])
            which = rows // c
            plan[name] = (c, which)
            n = self.manifest.rows(name)
            for ci in np.unique(which).tolist():
                cached = self._cache.get((name, ci))
                need = int(rows[which == ci].max()) - ci * c
                if cached is None or cached.shape[0] <= need:
                    da = self._direct.get(name)
                    if da is not None:  # plain codecs: read and decode it ourselves
                        direct.append(((name, ci), read_pool().submit(da.read, self.dir, ci)))
                    else:
                        jobs.append(arr.async_array.getitem(slice(ci * c,
                                                                  min((ci + 1) * c, n))))
                        keys.append((name, ci))
                else:
                    held[(name, ci)] = cached
                    self._cache.move_to_end((name, ci))
        fetched = zarr_sync(gather_jobs(jobs)) if jobs else []
        for key, res in zip(keys, fetched, strict=True):
            held[key] = np.asarray(res)
            self._cache_put(key, held[key])
        for (name, ci), fut in direct:
            n = self.manifest.rows(name) - ci * int(self.arrays[name].chunks[0])
            held[(name, ci)] = fut.result()[:n]  # committed rows only, like Zarr's slice
            self._cache_put((name, ci), held[(name, ci)])
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
