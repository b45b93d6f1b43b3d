"""Host-side helpers of the chunked fused losses: chunk sizes, weight-gradient accumulation."""

from __future__ import annotations

import torch


def rows_per_chunk(vocab: int, chunk_mib: float, *, min_rows: int = 16) -> int:
    """Rows such that a (rows, vocab) float32 chunk takes about `chunk_mib` MiB (at least
    `min_rows`, so small budgets still make matmuls of a useful size)."""
    if chunk_mib <= 0:
        raise ValueError(f"chunk_mib={chunk_mib}: must be > 0 (MiB per chunk buffer)")
    return max(min_rows, int(chunk_mib * 2**20) // (4 * max(vocab, 1)))


def accumulate_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, *,
                           block: int = 16384) -> None:
    """grad_w (V, d) fp32 += g^T (V, n) @ h (n, d) without a (V, d) temporary in fp32 (in place)
    or, for 16-bit inputs, with a (block, d) one at a time (fp32 accumulation across chunks)."""
    if g.dtype == torch.float32 and h.dtype == torch.float32:
        grad_w.addmm_(g.t(), h)
        return
    for v0 in range(0, g.shape[1], block):
        grad_w[v0:v0 + block].add_(g[:, v0:v0 + block].t() @ h)
