"""Copilot RMSE loss against a sparse error target (docs/method.md §5), eager and fused.

Per sequence s: rmse_s = sqrt( (1/n_s) sum_i ||f_i - ell_i||^2 + eps ), loss = mean_s rmse_s, with
ell_i = onehot(y_i) - sum_k p_ik onehot(t_ik) and f_i = W h_i + b the Copilot head's output.

Two entry points:
- `copilot_rmse_loss(f, ...)`: the eager path on a dense f (N, V). It is the reference the fused
  op is tested against, and the unfused training path (`kernels.fused: false`).
- `fused_copilot_rmse_loss(h, weight, bias, ...)`: the same loss and its gradients for h, W and b
  without the (N, V) matrix. Tokens are processed in chunks aligned to sequence boundaries, so
  each chunk's per-sequence RMSE, hence its gradient coefficient, is known once the chunk's f is.
  The gradients are computed during the forward (three chunk-sized matmuls per chunk: f, dh, dW)
  and scaled by the upstream gradient in the backward, so f is never recomputed.
  Per-chunk row work (bias, sparse target, squared error, gradient) is one Triton kernel pair
  (`impl="triton"`) or torch ops (`impl="torch"`); the matmuls are cuBLAS/MKL either way.

Why chunks and not the Gram route (||f||^2 = h^T (W^T W) h): the Gram route needs fewer FLOPs
when N > d, but it computes ||f - ell||^2 as a difference of O(1) terms, which loses most of its
digits in fp32 exactly when the Copilot is good (small loss). Here every chunk sums
(f_v - ell_v)^2 directly: no cancellation. docs/kernels.md has the measurements.
"""

from __future__ import annotations

import torch

from tcp.kernels.chunking import LinearGrads, rows_per_chunk, with_bias_fp32
from tcp.kernels.dispatch import resolve

try:  # Triton is optional on CPU-only hosts; `dispatch.resolve` never picks it there.
    import triton
    import triton.language as tl

    from tcp.kernels.chunking import load_row_block
except Exception:  # pragma: no cover - exercised on hosts without triton
    triton = None

_EPS = 1e-12


# ----------------------------------------------------------------------------- eager reference
def sparse_target(labels: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k+1) columns and values of ell = onehot(y) - sum_k p_k onehot(t_k) (duplicates add)."""
    ids = torch.cat([labels[:, None], topk_ids], dim=1).long()
    vals = torch.cat([torch.ones_like(labels[:, None], dtype=torch.float32),
                      -topk_probs.float()], dim=1)
    return ids, vals


def error_sq_norm(labels: torch.Tensor, topk_ids: torch.Tensor,
                  topk_probs: torch.Tensor) -> torch.Tensor:
    """(N,) ||ell_i||^2 of the sparse errors (fp32): the zero-Copilot baseline."""
    p = topk_probs.float()
    hit = (topk_ids == labels[:, None]).float()
    return 1.0 - 2.0 * (p * hit).sum(-1) + (p * p).sum(-1)


def sq_error(f: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
             topk_probs: torch.Tensor) -> torch.Tensor:
    """(N,) ||f_i - ell_i||^2 for dense f (N, V), in fp32, summed directly (no cancellation)."""
    ids, vals = sparse_target(labels, topk_ids, topk_probs)
    e = f.float().scatter_add(1, ids, -vals)
    return e.pow(2).sum(-1)


def per_sequence_rmse(sq: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """(S,) sqrt(mean over each sequence's tokens of sq + eps), seq_index (N,) in [0, S)."""
    tot = torch.zeros(num_seqs, dtype=sq.dtype, device=sq.device).index_add_(0, seq_index, sq)
    cnt = torch.zeros(num_seqs, dtype=sq.dtype, device=sq.device).index_add_(
        0, seq_index, torch.ones_like(sq))
    return torch.sqrt(tot / cnt.clamp_min(1.0) + _EPS)


def zero_baseline(labels: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor,
                  seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """The loss of f = 0 (docs/method.md §7), detached."""
    with torch.no_grad():
        return per_sequence_rmse(error_sq_norm(labels, topk_ids, topk_probs), seq_index,
                                 num_seqs).mean()


def copilot_rmse_loss(f: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                      topk_probs: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sequence RMSE on a dense f, and the zero-baseline RMSE (f = 0), eagerly.

    Args:
        f: (N, V) predicted errors at the N target tokens.
        labels: (N,) y_i. topk_ids, topk_probs: (N, k). seq_index: (N,) sequence of each token.
    Returns:
        (loss, zero_baseline): scalars; the baseline is detached.
    """
    sq = sq_error(f, labels, topk_ids, topk_probs)
    loss = per_sequence_rmse(sq, seq_index, num_seqs).mean()
    return loss, zero_baseline(labels, topk_ids, topk_probs, seq_index, num_seqs)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _err_sq_kernel(e_ptr, bias_ptr, part_ptr, V, stride_e, n_blocks,
                       HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
        # Program (row, block): the block's sum of (e + b)^2 in fp32, one partial per program
        # (summed by the host in a fixed order: deterministic, no atomics).
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        x, _, _ = load_row_block(e_ptr, bias_ptr, row, stride_e, blk, V, 0.0, HAS_BIAS, BLOCK_V)
        tl.store(part_ptr + row * n_blocks + blk, tl.sum(x * x, axis=0))

    @triton.jit
    def _err_grad_kernel(e_ptr, bias_ptr, coef_ptr, V, stride_e, HAS_BIAS: tl.constexpr,
                         BLOCK_V: tl.constexpr):
        # e <- coef_row * (e + b), in place: each element is read, then written, by one program.
        row = tl.program_id(0).to(tl.int64)
        x, cols, m = load_row_block(e_ptr, bias_ptr, row, stride_e, tl.program_id(1), V, 0.0,
                                    HAS_BIAS, BLOCK_V)
        coef = tl.load(coef_ptr + row)
        tl.store(e_ptr + row * stride_e + cols, (coef * x).to(e_ptr.dtype.element_ty), mask=m)


_BLOCK_V = 2048


# ----------------------------------------------------------------------------- chunk row work
def _chunk_sq(backend: str, e: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n,) ||e + b||^2 of a chunk's rows in fp32; e (n, V) holds f - ell without the bias."""
    if backend == "torch":
        if e.dtype == torch.float32 and bias is None:  # no temporary: a row-wise dot
            return torch.einsum("ij,ij->i", e, e)
        x = with_bias_fp32(e, bias)
        return (x * x).sum(-1)
    n, V = e.shape
    n_blocks = triton.cdiv(V, _BLOCK_V)
    part = torch.empty(n, n_blocks, dtype=torch.float32, device=e.device)
    _err_sq_kernel[(n, n_blocks)](e, bias if bias is not None else e, part, V, e.stride(0),
                                  n_blocks, HAS_BIAS=bias is not None, BLOCK_V=_BLOCK_V)
    return part.sum(1)


def _chunk_grad(backend: str, e: torch.Tensor, bias: torch.Tensor | None,
                coef: torch.Tensor) -> torch.Tensor:
    """coef_i * (e + b)_i written over e (a chunk temporary), in e's dtype."""
    if backend == "torch":
        if e.dtype == torch.float32 and bias is None:
            return e.mul_(coef[:, None])
        return e.copy_(with_bias_fp32(e, bias) * coef[:, None])
    n, V = e.shape
    _err_grad_kernel[(n, triton.cdiv(V, _BLOCK_V))](e, bias if bias is not None else e, coef, V,
                                                    e.stride(0), HAS_BIAS=bias is not None,
                                                    BLOCK_V=_BLOCK_V)
    return e


# ----------------------------------------------------------------------------- fused op
def sequence_chunks(seq_len: list[int], rows: int) -> list[tuple[int, int, int, int]]:
    """Split sequences (in order, `seq_len` tokens each) into chunks of about `rows` tokens.

    Returns (token_start, token_end, seq_start, seq_end) per chunk; a chunk always holds whole
    sequences, so a sequence longer than `rows` is a chunk of its own.
    """
    chunks, t0, s0, t = [], 0, 0, 0
    for s, n in enumerate(seq_len):
        if t > t0 and t - t0 + n > rows:
            chunks.append((t0, t, s0, s))
            t0, s0 = t, s
        t += n
    if t > t0 or not chunks:
        chunks.append((t0, t, s0, len(seq_len)))
    return chunks


class _FusedRMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ids, vals, seq_index, seq_len_cpu, backend, chunk_rows):
        S = seq_len_cpu.numel()
        grads = LinearGrads(h, weight, bias, ctx.needs_input_grad)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        n_tok = seq_len_cpu.to(h.device, torch.float32)
        for a, b, s0, s1 in sequence_chunks(seq_len_cpu.tolist(), chunk_rows):
            hc = h[a:b]
            e = hc @ weight.t()  # (n, V) in the input dtype: the only chunk-sized buffer
            # e <- f - ell (the bias is added by the row work): the sparse target goes into the
            # buffer as a difference, so every (f_v + b_v - ell_v)^2 is summed directly and
            # nothing cancels when the loss is small.
            e.scatter_add_(1, ids[a:b], (-vals[a:b]).to(e.dtype))
            row_bias = bias
            if backend == "torch" and e.dtype == torch.float32 and bias is not None:
                e.add_(bias)  # once, in place: the torch row work then needs no temporaries
                row_bias = None
            sq = _chunk_sq(backend, e, row_bias)
            local = seq_index[a:b] - s0
            tot = torch.zeros(s1 - s0, dtype=torch.float32, device=h.device).index_add_(
                0, local, sq)
            rmse = torch.sqrt(tot / n_tok[s0:s1] + _EPS)
            total += rmse.sum()
            if grads.needed:
                # d loss / d f_i = (f_i - ell_i) / (S * rmse_s * n_s), token i of sequence s.
                coef = (1.0 / (S * rmse * n_tok[s0:s1]))[local]
                grads.add(a, b, _chunk_grad(backend, e, row_bias, coef), hc, weight)
        ctx.grads = grads
        return total / S

    @staticmethod
    def backward(ctx, grad_out):
        return (*ctx.grads.scaled(grad_out), None, None, None, None, None, None)


def fused_copilot_rmse_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, topk_ids: torch.Tensor,
                            topk_probs: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, *,
                            impl: str | None = "auto", chunk_mib: float = 64.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`copilot_rmse_loss(h @ weight.T + bias, ...)` without the (N, V) matrix.

    Args:
        h: (N, d) head inputs at the target tokens, grouped by sequence (seq_index ascending).
        weight: (V, d), bias: (V,) or None: the Copilot's output layer.
        labels: (N,), topk_ids, topk_probs: (N, k): the sparse target. seq_index: (N,).
        impl: "auto" | "torch" | "triton" (see `tcp.kernels.dispatch`).
        chunk_mib: size of the one (rows, V) chunk buffer; rows = chunk_mib / (V * 4 bytes).
    Returns:
        (loss, zero_baseline): scalars; the baseline is detached.
    """
    N = h.shape[0]
    if seq_index.numel() != N or labels.numel() != N:
        raise ValueError("fused_copilot_rmse_loss: h, labels and seq_index need N rows each")
    if N > 1 and bool((seq_index[1:] < seq_index[:-1]).any()):
        raise ValueError("fused_copilot_rmse_loss: tokens must be grouped by sequence "
                         "(seq_index non-decreasing)")
    seq_len = torch.bincount(seq_index, minlength=num_seqs).cpu()
    if bool((seq_len == 0).any()):
        raise ValueError("fused_copilot_rmse_loss: every sequence needs at least one token")
    backend = resolve(impl, h.device)
    ids, vals = sparse_target(labels, topk_ids, topk_probs)
    rows = rows_per_chunk(weight.shape[0], chunk_mib)
    loss = _FusedRMSE.apply(h, weight, bias, ids.contiguous(), vals.contiguous(), seq_index,
                            seq_len, backend, rows)
    return loss, zero_baseline(labels, topk_ids, topk_probs, seq_index, num_seqs)
