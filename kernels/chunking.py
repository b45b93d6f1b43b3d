"""What the chunked fused losses (copilot_loss, pilot_loss) share.

Both compute a loss on y = h W^T + b one chunk of rows at a time, with the (rows, V) chunk
buffer turned in place into d loss / d y; `LinearGrads` turns those chunk gradients into the
gradients of h, W and b during the forward, and the backward only scales them. The row work on
the chunk reads one block of a row (plus the bias) in fp32: `load_row_block` in Triton,
`with_bias_fp32` in torch.
"""

from __future__ import annotations

import torch

try:  # Triton is optional on CPU-only hosts; `dispatch.resolve` never picks it there.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised on hosts without triton
    triton = None


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


class LinearGrads:
    """fp32 gradients of h (N, d), W (V, d) and b (V,) for y = h W^T + b, accumulated chunk by
    chunk during a fused forward; only those in `needs` (autograd's needs_input_grad) exist."""

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 needs: tuple[bool, ...]) -> None:
        self.h = torch.zeros_like(h, dtype=torch.float32) if needs[0] else None
        self.w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        self.b = (torch.zeros_like(bias, dtype=torch.float32)
                  if bias is not None and needs[2] else None)
        self.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)

    @property
    def needed(self) -> bool:
        """Whether any gradient is wanted (no_grad forwards skip the gradient work)."""
        return self.h is not None or self.w is not None or self.b is not None

    def add(self, a: int, b: int, g: torch.Tensor, hc: torch.Tensor,
            weight: torch.Tensor) -> None:
        """Rows a:b's chunk gradient g = d loss / d y (n, V), with hc = h[a:b] (n, d)."""
        if self.h is not None:
            self.h[a:b] = g @ weight
        if self.w is not None:
            accumulate_weight_grad(self.w, g, hc)
        if self.b is not None:
            self.b += g.float().sum(0)

    def scaled(self, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """(dh, dW, db) times the upstream gradient, in the inputs' dtypes; scales in place (no
        second (V, d) buffer; fp32 inputs get the buffers themselves) and lets them go."""
        out = tuple(None if g is None else g.mul_(grad_out).to(dt)
                    for g, dt in zip((self.h, self.w, self.b), self.dtypes, strict=True))
        self.h = self.w = self.b = None
        return out


def with_bias_fp32(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + b in fp32 (torch row work); x itself when it is fp32 and there is no bias."""
    return x.float() if bias is None else x.float() + bias.float()


if triton is not None:

    @triton.jit
    def load_row_block(ptr, bias_ptr, row, stride, blk, V, OTHER: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
        """Block `blk` of row `row` of a (n, V) chunk, plus the bias, in fp32; masked columns
        read OTHER. Returns (x, cols, mask)."""
        cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
        m = cols < V
        x = tl.load(ptr + row * stride + cols, mask=m, other=OTHER).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=m, other=0.0).to(tl.float32)
        return x, cols, m
