"""Entries <-> the rows the store holds: `batch_to_rows` (what a writer appends),
`rows_to_batch` (what a reader returns), and `stored_form`, the two in a row: an entry exactly
as it will read back once committed (storage dtype, integer widths, lossy rounding), so
uncommitted entries can be replayed from memory with the same values as from disk."""

from __future__ import annotations

import numpy as np
import torch

from tcp.mistake_log.format import STATE_ARRAYS, Schema
from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths


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


def rows_to_batch(rows: dict[str, np.ndarray], schema: Schema, rank: int) -> MistakeBatch:
    """Stored rows of some entries (per-entry arrays one row per entry, in order; token and
    prompt arrays those entries' rows, concatenated) -> the MistakeBatch a reader returns."""
    sd = schema.state_dtype
    return MistakeBatch(
        x_tilde=state_tensor(rows["x_tilde"], sd),
        x_offsets=offsets_from_lengths(torch.from_numpy(rows["x_len"])),
        h=state_tensor(rows["h"], sd),
        y_offsets=offsets_from_lengths(torch.from_numpy(rows["y_len"])),
        labels=torch.from_numpy(rows["labels"]).long(),
        topk_ids=torch.from_numpy(rows["topk_ids"]).long(),
        topk_probs=torch.from_numpy(rows["topk_probs"]),
        residual=torch.from_numpy(rows["residual"]),
        step=torch.from_numpy(rows["step"]),
        sample_id=torch.from_numpy(rows["sample_id"]),
        rank=torch.full((rows["step"].shape[0],), rank, dtype=torch.long),
        loss=torch.from_numpy(rows["loss"]),
    )


def stored_form(batch: MistakeBatch, schema: Schema, rank: int, *,
                keepbits: int | None = None) -> MistakeBatch:
    """`batch` (CPU) as a reader will read it back from a store with this schema and
    `lossy_keepbits` (the same BitRound the store's filter applies)."""
    rows = batch_to_rows(batch, schema)
    if keepbits is not None:
        from numcodecs import BitRound  # only for the lossy option

        rnd = BitRound(keepbits=keepbits)
        for name in STATE_ARRAYS:
            rows[name] = np.asarray(rnd.decode(rnd.encode(np.ascontiguousarray(rows[name]))))
    return rows_to_batch(rows, schema, rank)
