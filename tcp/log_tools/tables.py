"""Per-entry facts of a log (step, sample, loss, lengths, raw size), read from the small
per-entry arrays, plus the token-level facts the policies and `info` need, streamed.

Memory: the per-entry arrays of every shard (about 60 bytes per entry) plus one block of
`BLOCK_ROWS` token rows; never a whole token array.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tcp.log_tools.checks import damaged, require_log
from tcp.mistake_log.format import (
    ENTRY_ARRAYS,
    PROMPT_ARRAYS,
    TOKEN_ARRAYS,
    Manifest,
    MistakeLogCorrupt,
    Schema,
    ranks_in,
)
from tcp.mistake_log.reader import RankStoreReader

BLOCK_ROWS = 1 << 20
"""Token rows decoded at a time."""
READ_ERRORS = (MistakeLogCorrupt, ValueError, KeyError, FileNotFoundError)
"""What a damaged log raises while being read (a failed chunk CRC32C is a ValueError)."""


def row_bytes(schema: Schema, names: tuple[str, ...]) -> int:
    """Raw bytes of one row of each of `names`, summed."""
    return sum(int(np.prod(schema.row_shape(n), dtype=np.int64)) * np.dtype(schema.dtype(n))
               .itemsize for n in names)


def entry_raw_bytes(schema: Schema, x_len: np.ndarray, y_len: np.ndarray) -> np.ndarray:
    """(B,) raw bytes of each entry, as the writer counts them (`manifest.raw_bytes`)."""
    return (row_bytes(schema, ENTRY_ARRAYS) + x_len * row_bytes(schema, PROMPT_ARRAYS)
            + y_len * row_bytes(schema, TOKEN_ARRAYS)).astype(np.int64)


@dataclass
class ShardTable:
    """The committed entries of one rank's shard, one row per entry."""

    rank: int
    manifest: Manifest
    step: np.ndarray
    sample_id: np.ndarray
    loss: np.ndarray
    x_len: np.ndarray
    y_len: np.ndarray
    raw: np.ndarray
    """(B,) raw bytes per entry."""
    mistakes: np.ndarray | None = None
    """(B,) target tokens whose stored top-1 (topk_ids[:, 0]) is not the label (when asked)."""

    @property
    def ratio(self) -> float:
        """Stored/raw bytes of the shard (1 when empty)."""
        m = self.manifest
        return m.stored_bytes / m.raw_bytes if m.raw_bytes else 1.0

    def estimated(self, mask: np.ndarray | None = None) -> float:
        """Estimated stored bytes of the entries in `mask` (all when None)."""
        raw = self.raw if mask is None else self.raw[mask]
        return float(raw.sum()) * self.ratio


@dataclass
class LogTables:
    """Every shard of one log."""

    root: Path
    schema: Schema
    attrs: dict[str, Any]
    shards: list[ShardTable]

    @property
    def entries(self) -> int:
        return sum(s.step.size for s in self.shards)

    @property
    def last_step(self) -> int | None:
        """The last committed step over all ranks."""
        last = [int(s.step[-1]) for s in self.shards if s.step.size]
        return max(last) if last else None


def root_attrs(root: Path) -> dict[str, Any]:
    """The root group's attributes (schema, history, ...)."""
    return dict(json.loads((root / "zarr.json").read_text()).get("attributes", {}))


def load_tables(root: Path | str, *, mistakes: bool = False,
                ranks: list[int] | None = None) -> LogTables:
    """The per-entry facts of every shard (or of `ranks`). `mistakes=True` also streams
    `labels` and `topk_ids` to count each entry's top-1 mistakes."""
    root = require_log(Path(root))
    try:
        shards = []
        schema: Schema | None = None
        for rank in ranks if ranks is not None else ranks_in(root):
            rd = RankStoreReader(root, rank, cache_mib=0)
            schema = rd.schema
            n = rd.num_entries
            cols = {k: np.asarray(rd.arrays[k][:n]) for k in
                    ("step", "sample_id", "loss", "x_len", "y_len")}
            t = ShardTable(rank=rank, manifest=rd.manifest, **cols,
                           raw=entry_raw_bytes(rd.schema, cols["x_len"], cols["y_len"]))
            if mistakes:
                t.mistakes = mistake_counts(rd)
            shards.append(t)
        if schema is None:
            schema = Schema.from_attrs(root_attrs(root), root)
        return LogTables(root, schema, root_attrs(root), shards)
    except READ_ERRORS as e:
        raise damaged(root, e) from e


def _token_blocks(rd: RankStoreReader, names: tuple[str, ...]):
    """Yield (first_row, {name: rows}) over the committed token rows, BLOCK_ROWS at a time."""
    n = rd.manifest.tokens
    for lo in range(0, n, BLOCK_ROWS):
        hi = min(n, lo + BLOCK_ROWS)
        yield lo, {k: np.asarray(rd.arrays[k][lo:hi]) for k in names}


def mistake_counts(rd: RankStoreReader) -> np.ndarray:
    """(B,) per entry, its target tokens whose stored top-1 prediction is not the label.
    Entries tile the token rows in order (verify checks it), so a running prefix count of
    mistaken tokens, sampled at the entry boundaries, gives each entry's count."""
    n = rd.num_entries
    y_len = np.asarray(rd.arrays["y_len"][:n])
    bounds = np.concatenate([[0], np.cumsum(y_len)])  # (B+1,) token offsets
    prefix = np.zeros(bounds.size, dtype=np.int64)
    running = 0
    for lo, blk in _token_blocks(rd, ("labels", "topk_ids")):
        wrong = np.cumsum(blk["topk_ids"][:, 0] != blk["labels"])
        hi = lo + wrong.size
        sel = (bounds > lo) & (bounds <= hi)
        prefix[sel] = running + wrong[bounds[sel] - lo - 1]
        running += int(wrong[-1]) if wrong.size else 0
    return np.diff(prefix)


def residual_sum(rd: RankStoreReader) -> tuple[float, int]:
    """(sum, count) of the residual mass over the committed target tokens."""
    total, count = 0.0, 0
    for _, blk in _token_blocks(rd, ("residual",)):
        total += float(blk["residual"].astype(np.float64).sum())
        count += blk["residual"].size
    return total, count
