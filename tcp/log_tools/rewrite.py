"""Copy chosen entries of one or more source shards into a new store.

Each output shard is built from one or more *parts* (a source shard and the indices of the
entries to take from it). Several parts are merged stably by step: entries of one step keep the
parts' order, then their order within the part. Entries are read and written in blocks of about
`BLOCK_BYTES` raw bytes, each block one commit, so memory does not grow with the log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from tcp.config import ZarrStoreConfig
from tcp.log_tools.errors import UsageError
from tcp.log_tools.tables import LogTables, ShardTable
from tcp.mistake_log.format import Manifest, Schema
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.shard_writer import RankStoreWriter
from tcp.runtime.faults import fault_point

BLOCK_BYTES = 64 * 2**20
"""Raw bytes read, held and committed at a time."""
BLOCK_ENTRIES = 1 << 16
"""At most this many entries per block."""
READ_CACHE_MIB = 64.0
"""Decoded-chunk cache of each source reader (blocks are read in order, so little is reused)."""


@dataclass(frozen=True)
class Part:
    """Entries `idx` (increasing) of shard `rank` of the log at `root`."""

    root: Path
    rank: int
    idx: np.ndarray
    steps: np.ndarray
    """(len(idx),) their steps, for the merge order."""
    raw: np.ndarray
    """(len(idx),) their raw bytes, for the block sizes."""


@dataclass(frozen=True)
class OutShard:
    """One shard of the new store and where its entries come from."""

    rank: int
    parts: tuple[Part, ...]
    dropped_entries: int = 0
    """Entries the original writer dropped (carried into the new manifest)."""

    @property
    def entries(self) -> int:
        return sum(p.idx.size for p in self.parts)


@dataclass
class _Sources:
    """One open reader per source shard."""

    readers: dict[tuple[Path, int], RankStoreReader] = field(default_factory=dict)

    def get(self, p: Part) -> RankStoreReader:
        key = (p.root, p.rank)
        if key not in self.readers:
            self.readers[key] = RankStoreReader(p.root, p.rank, cache_mib=READ_CACHE_MIB)
        return self.readers[key]


def config_from_codec(codec: dict[str, Any], **overrides: Any) -> ZarrStoreConfig:
    """The store options a shard was written with (its manifest's `codec`), with `overrides`
    (None values ignored). Raises UsageError naming the flag when the result is invalid."""
    base = {"compressor": codec.get("compressor", "zstd"), "level": codec.get("level", 3),
            "shuffle": bool(codec["shuffle"]) if codec.get("shuffle") is not None else True,
            "checksum": codec.get("checksum") is not None,
            "shard_chunks": codec.get("shard_chunks", 0),
            "chunk_mib": codec.get("chunk_mib", 1.0),
            "lossy_keepbits": codec.get("lossy_keepbits")}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "compressor" in given and "level" not in given and given["compressor"] != \
            base["compressor"]:
        given["level"] = ZarrStoreConfig.level  # the new compressor's default level
    try:
        return ZarrStoreConfig(**{**base, **given})
    except ValueError as e:
        key = str(e).split(":", 1)[0]
        raise UsageError(f"--{key.replace('_', '-')}: {str(e).split(':', 1)[-1].strip()}") \
            from None


def part_of(tables: LogTables, s: ShardTable, mask: np.ndarray | None = None) -> Part:
    """The entries of shard `s` of `tables` in `mask` (all when None), as a source part."""
    idx = np.arange(s.step.size) if mask is None else np.flatnonzero(mask)
    return Part(tables.root, s.rank, idx, s.step[idx], s.raw[idx])


def merge_order(parts: tuple[Part, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(part number, position in part) of every entry, in output order: by step, ties by part
    then position (a stable merge)."""
    steps = np.concatenate([p.steps for p in parts]) if parts else np.zeros(0, np.int64)
    part_no = np.concatenate([np.full(p.idx.size, i) for i, p in enumerate(parts)]) \
        if parts else np.zeros(0, np.int64)
    pos = np.concatenate([np.arange(p.idx.size) for p in parts]) if parts else \
        np.zeros(0, np.int64)
    order = np.lexsort((pos, part_no, steps)) if len(parts) > 1 else np.arange(steps.size)
    return part_no[order], pos[order]


def blocks(raw: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) ranges of consecutive entries of about BLOCK_BYTES raw bytes (>= 1 entry)."""
    cum = np.cumsum(raw)
    out, lo = [], 0
    while lo < raw.size:
        base = cum[lo - 1] if lo else 0
        hi = int(np.searchsorted(cum, base + BLOCK_BYTES, side="right"))
        hi = min(max(hi, lo + 1), lo + BLOCK_ENTRIES)
        out.append((lo, hi))
        lo = hi
    return out


def _read_block(src: _Sources, parts: tuple[Part, ...], part_no: np.ndarray,
                pos: np.ndarray) -> MistakeBatch:
    """The block's entries, in the given order."""
    got = []
    for i, p in enumerate(parts):
        sel = part_no == i
        if sel.any():
            got.append(src.get(p).read(p.idx[pos[sel]]))
    batch = MistakeBatch.cat(got, device="cpu")
    if len(got) > 1:  # regroup from part-major (as concatenated) to the merge order
        grouped = np.argsort(part_no, kind="stable")
        perm = np.empty_like(grouped)
        perm[grouped] = np.arange(grouped.size)
        batch = batch.select(torch.from_numpy(perm))
    return batch


@dataclass
class Written:
    """What `write_log` wrote."""

    manifests: list[Manifest]
    byte_checked: set[int] = field(default_factory=set)
    """Ranks copied file by file with every byte checked (`RankStoreWriter.copy_from`): their
    content is the source's, so verifying them needs no decoding."""


def write_log(dest: Path, shards: list[OutShard], *, schema: Schema, cfg: ZarrStoreConfig,
              attrs: dict[str, Any], desc: str = "copy") -> Written:
    """Create the store `dest` (root attrs `attrs`, which hold the schema) and fill each shard.
    A shard that takes a whole source shard, stored with the same options, is copied file by
    file (`RankStoreWriter.copy_from`); others are read and re-encoded a block at a time.
    Fault point `kill@compact=1`: after the first block's commit (or shard's copy)."""
    group = zarr.open_group(dest, mode="a", zarr_format=3)
    group.attrs.update(attrs)
    src = _Sources()
    total = sum(s.entries for s in shards)
    bar = tqdm(total=total, desc=desc, unit=" entries", file=sys.stderr,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    out = Written([])
    first = True
    try:
        for shard in shards:
            w = RankStoreWriter(dest, shard.rank, schema, cfg)
            w.note_dropped(shard.dropped_entries)
            whole = _whole_shard(src, shard)
            if whole is not None and w.same_layout(whole):
                if w.copy_from(whole):
                    out.byte_checked.add(shard.rank)
                bar.update(shard.entries)
                if first:
                    fault_point("compact", step=1, rank=0)
                    first = False
                out.manifests.append(w.manifest)
                continue
            part_no, pos = merge_order(shard.parts)
            raw = np.concatenate([p.raw for p in shard.parts])[_flat(shard.parts, part_no, pos)] \
                if shard.parts else np.zeros(0, np.int64)
            for lo, hi in blocks(raw):
                w.append(_read_block(src, shard.parts, part_no[lo:hi], pos[lo:hi]))
                w.commit()
                bar.update(hi - lo)
                if first:
                    fault_point("compact", step=1, rank=0)
                    first = False
            out.manifests.append(w.manifest)
    finally:
        bar.close()
    return out


def _whole_shard(src: _Sources, shard: OutShard) -> RankStoreReader | None:
    """The reader of the one source shard `shard` takes whole (None: several parts, or some
    entries left out)."""
    if len(shard.parts) != 1:
        return None
    p = shard.parts[0]
    rd = src.get(p)
    n = rd.num_entries
    if p.idx.size != n or (n and (p.idx[0] != 0 or p.idx[-1] != n - 1)):
        return None
    return rd


def _flat(parts: tuple[Part, ...], part_no: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Index into the parts' concatenation of each (part, position)."""
    starts = np.concatenate([[0], np.cumsum([p.idx.size for p in parts])[:-1]])
    return starts[part_no] + pos
