"""How many token rows a fused op processes at once: one (rows, V) fp32 buffer of a set size."""

from __future__ import annotations


def rows_per_chunk(vocab: int, chunk_mib: float, *, min_rows: int = 16) -> int:
    """Rows such that a (rows, vocab) float32 chunk takes about `chunk_mib` MiB (at least
    `min_rows`, so small budgets still make matmuls of a useful size)."""
    if chunk_mib <= 0:
        raise ValueError(f"chunk_mib={chunk_mib}: must be > 0 (MiB per chunk buffer)")
    return max(min_rows, int(chunk_mib * 2**20) // (4 * max(vocab, 1)))
