"""`tcp-log export`: selected committed entries to Parquet or NumPy `.npz`, and back.

Parquet layout: one row per entry, written in row groups of about `rewrite.BLOCK_BYTES` raw
bytes (memory stays bounded)::

    rank, step, sample_id   int64           the entry (rank = the shard it was read from)
    loss                    float32         the sample's Pilot loss at that step
    x_tilde                 list<list<S>[d]>      its prompt rows X~          (n_x, d)
    h                       list<list<S>[d]>      pooled states, per target   (n_y, d)
    labels                  list<int32>            target tokens               (n_y,)
    topk_ids                list<list<int32>[k]>   top-k ids of p_hat          (n_y, k)
    topk_probs              list<list<float32>[k]> their probabilities         (n_y, k)
    residual                list<float32>          mass outside the top-k      (n_y,)

(lists are Arrow large_list, inner ones fixed_size_list.) S is the store's state dtype:
float32, float16, or uint16 holding bfloat16 bits. The schema metadata key `tcp` holds JSON
{format: "tcp-mistake-log-export", version, d_model, topk, state_dtype, source, selection}.

`.npz` layout: the arrays of `MistakeBatch.state_dict()` (x_tilde, x_offsets, h, y_offsets,
labels, topk_ids, topk_probs, residual, step, sample_id, rank, loss; states in the store's
dtype, bfloat16 as uint16 bits) plus `meta` (the same JSON). It is built in memory: use Parquet
for large selections.

Round trip: `load_export(file)` returns a MistakeBatch equal (every field, dtype and value) to
`RankStoreReader(log, rank).read(indices)` of the exported entries, in export order (by rank,
then entry order).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcp.log_tools.checks import damaged
from tcp.log_tools.errors import LogToolError, UsageError
from tcp.log_tools.rewrite import blocks
from tcp.log_tools.tables import READ_ERRORS, LogTables, load_tables
from tcp.mistake_log.format import Schema
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths
from tcp.mistake_log.rows import batch_to_rows, state_tensor
from tcp.runtime.atomic import publish, temp_path

EXPORT_FORMAT = "tcp-mistake-log-export"
EXPORT_VERSION = 1
_LISTS = ("x_tilde", "h", "labels", "topk_ids", "topk_probs", "residual")


@dataclass(frozen=True)
class Selection:
    """Which committed entries to export (None = no restriction)."""

    steps: tuple[int | None, int | None] | None = None
    """[first, last) steps; either end open."""
    rank: int | None = None
    sample_ids: frozenset[int] | None = None

    def describe(self) -> dict[str, Any]:
        return {"steps": list(self.steps) if self.steps else None, "rank": self.rank,
                "sample_ids": sorted(self.sample_ids) if self.sample_ids else None}


def selected(tables: LogTables, sel: Selection) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(rank, entry indices, their raw bytes) of the selected entries of each shard."""
    for s in tables.shards:
        keep = np.ones(s.step.size, dtype=bool)
        if sel.steps is not None:
            lo, hi = sel.steps
            keep &= (s.step >= lo if lo is not None else True) & \
                (s.step < hi if hi is not None else True)
        if sel.sample_ids is not None:
            keep &= np.isin(s.sample_id, np.fromiter(sel.sample_ids, np.int64))
        idx = np.flatnonzero(keep)
        yield s.rank, idx, s.raw[idx]


def export(path: Path | str, out: Path | str, sel: Selection, *, force: bool = False) -> int:
    """Write the selected entries to `out` (.parquet or .npz); returns how many."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".parquet", ".npz"):
        raise UsageError(f"--out {out}: the file name must end in .parquet or .npz")
    if out.exists() and not force:
        raise UsageError(f"--out {out} exists; choose another name or add --force")
    root = Path(path)
    tables = load_tables(root)
    ranks = [s.rank for s in tables.shards]
    if sel.rank is not None:
        if sel.rank not in ranks:
            raise UsageError(f"--rank {sel.rank}: {root} has shards of ranks {ranks}")
        tables.shards = [s for s in tables.shards if s.rank == sel.rank]
    picks = [p for p in selected(tables, sel) if p[1].size]
    n = sum(p[1].size for p in picks)
    if n == 0:
        raise LogToolError(f"{root}: no committed entries match {sel.describe()}; nothing written")
    sch = tables.schema
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "d_model": sch.d_model,
            "topk": sch.topk, "state_dtype": sch.state_dtype, "source": str(root.resolve()),
            "selection": sel.describe()}
    tmp = temp_path(out)
    try:
        batches = _batches(root, picks)
        if kind == ".parquet":
            _write_parquet(tmp, batches, tables.schema, meta)
        else:
            _write_npz(tmp, batches, tables.schema, meta)
        publish(tmp, out)  # durable, like every file tcp publishes (tcp.runtime.atomic)
    except READ_ERRORS as e:
        raise damaged(root, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _batches(root: Path, picks: list[tuple[int, np.ndarray, np.ndarray]]) -> \
        Iterator[MistakeBatch]:
    for rank, idx, raw in picks:
        rd = RankStoreReader(root, rank, cache_mib=64)
        for lo, hi in blocks(raw):
            yield rd.read(idx[lo:hi])


def _arrow_table(b: MistakeBatch, schema: Schema, meta: dict[str, Any]) -> Any:
    import pyarrow as pa  # optional: Parquet only

    rows = batch_to_rows(b, schema)

    def nested(name: str, offsets: torch.Tensor) -> Any:
        a = rows[name]
        flat = pa.array(a.reshape(-1))
        inner = pa.FixedSizeListArray.from_arrays(flat, a.shape[1]) if a.ndim == 2 else flat
        return pa.LargeListArray.from_arrays(pa.array(offsets.numpy().astype(np.int64)), inner)

    cols = {"rank": pa.array(b.rank.numpy().astype(np.int64)),
            "step": pa.array(rows["step"]), "sample_id": pa.array(rows["sample_id"]),
            "loss": pa.array(rows["loss"])}
    for name in _LISTS:
        cols[name] = nested(name, b.x_offsets if name == "x_tilde" else b.y_offsets)
    return pa.table(cols).replace_schema_metadata({"tcp": json.dumps(meta)})


def _write_parquet(tmp: Path, batches: Iterator[MistakeBatch], schema: Schema,
                   meta: dict[str, Any]) -> None:
    import pyarrow.parquet as pq  # optional: Parquet only

    writer = None
    try:
        for b in batches:
            t = _arrow_table(b, schema, meta)
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
    finally:
        if writer is not None:
            writer.close()


def _write_npz(tmp: Path, batches: Iterator[MistakeBatch], schema: Schema,
               meta: dict[str, Any]) -> None:
    b = MistakeBatch.cat(list(batches), device="cpu")
    rows = batch_to_rows(b, schema)
    arrays: dict[str, Any] = {k: rows[k] if k in ("h", "x_tilde") else v.numpy()
                              for k, v in b.state_dict().items()}
    arrays["meta"] = np.array(json.dumps(meta))
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_export(path: Path | str) -> MistakeBatch:
    """Read an export back as the MistakeBatch `RankStoreReader.read` gave (see the module
    docstring)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            d = {k: torch.from_numpy(z[k]) for k in z.files if k != "meta"}
        for k in ("h", "x_tilde"):
            d[k] = state_tensor(d[k].numpy(), meta["state_dtype"])
        return MistakeBatch(**d)
    import pyarrow as pa  # optional: Parquet only
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    meta = json.loads(t.schema.metadata[b"tcp"])

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        col = t.column(name).combine_chunks()
        vals = col.flatten()  # the rows this column's lists refer to
        if pa.types.is_fixed_size_list(vals.type):
            vals = vals.flatten()
        offs = np.asarray(col.offsets) - int(col.offsets[0].as_py())
        return vals.to_numpy(zero_copy_only=False), offs

    out: dict[str, torch.Tensor] = {}
    for name in _LISTS:
        vals, offs = flat(name)
        k = meta["d_model"] if name in ("h", "x_tilde") else meta["topk"]
        if name in ("x_tilde", "h", "topk_ids", "topk_probs"):
            vals = vals.reshape(-1, k)
        out[name] = torch.from_numpy(np.array(vals))  # a writable copy
        out["x_offsets" if name == "x_tilde" else "y_offsets"] = \
            offsets_from_lengths(torch.from_numpy(np.diff(offs)))
    for k in ("h", "x_tilde"):
        out[k] = state_tensor(out[k].numpy(), meta["state_dtype"])
    out["labels"], out["topk_ids"] = out["labels"].long(), out["topk_ids"].long()
    for name in ("rank", "step", "sample_id", "loss"):
        out[name] = torch.from_numpy(np.array(t.column(name).to_numpy()))
    return MistakeBatch(**out)
