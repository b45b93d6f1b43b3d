"""Copilot RMSE loss against a sparse error target (METHOD.md §3), eager and fused.

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

Why chunks and not the Gram route of METHOD §3 (||f||^2 = h^T (W^T W) h): the Gram route needs
fewer FLOPs when N > d, but it computes ||f - ell||^2 as a difference of O(1) terms, which loses
most of its digits in fp32 exactly when the Copilot is good (small loss). Here every chunk sums
(f_v - ell_v)^2 directly: no cancellation. docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tcp.kernels.chunking import rows_per_chunk
from tcp.kernels.dispatch import resolve

try:  # Triton is optional on CPU-only hosts; `dispatch.resolve` never picks it there.
    import triton
    import triton.language as tl
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
    """The loss of f = 0 (METHOD §6), detached."""
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
    def _row_error(f_ptr, bias_ptr, ids, vals, row, cols, V, stride_f, HAS_BIAS: tl.constexpr):
        """fp32 (f + b - ell) on one row's column tile, 0 outside the vocabulary."""
        m = cols < V
        x = tl.load(f_ptr + row * stride_f + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=m, other=0.0).to(tl.float32)
        ell = tl.sum(tl.where(cols[:, None] == ids[None, :], vals[None, :], 0.0), axis=1)
        return tl.where(m, x - ell, 0.0)

    @triton.jit
    def _err_sq_kernel(f_ptr, bias_ptr, ids_ptr, vals_ptr, sq_ptr, V, stride_f, K1,
                       HAS_BIAS: tl.constexpr, K1_P2: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, K1_P2)
        ids = tl.load(ids_ptr + row * K1 + kk, mask=kk < K1, other=-1)
        vals = tl.load(vals_ptr + row * K1 + kk, mask=kk < K1, other=0.0)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = _row_error(f_ptr, bias_ptr, ids, vals, row, v0 + tl.arange(0, BLOCK_V), V,
                           stride_f, HAS_BIAS)
            acc += x * x
        tl.store(sq_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _err_grad_kernel(f_ptr, bias_ptr, ids_ptr, vals_ptr, coef_ptr, g_ptr, V, stride_f,
                         stride_g, K1, HAS_BIAS: tl.constexpr, K1_P2: tl.constexpr,
                         BLOCK_V: tl.constexpr):
        # g may alias f: each element is read before it is written, by the same program.
        row = tl.program_id(0).to(tl.int64)
        kk = tl.arange(0, K1_P2)
        ids = tl.load(ids_ptr + row * K1 + kk, mask=kk < K1, other=-1)
        vals = tl.load(vals_ptr + row * K1 + kk, mask=kk < K1, other=0.0)
        coef = tl.load(coef_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = _row_error(f_ptr, bias_ptr, ids, vals, row, cols, V, stride_f, HAS_BIAS)
            tl.store(g_ptr + row * stride_g + cols, (coef * x).to(g_ptr.dtype.element_ty),
                     mask=cols < V)


def _launch_cfg(k1: int) -> tuple[int, int]:
    k1_p2 = triton.next_power_of_2(k1)
    return k1_p2, max(64, min(1024, 16384 // k1_p2))  # keeps the (BLOCK_V, K1) compare tile small


# ----------------------------------------------------------------------------- chunk row work
def _error_rows(f: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A fresh fp32 copy of f + b (never f itself: callers modify it in place)."""
    return f.to(torch.float32, copy=True) if bias is None else f.float() + bias.float()


def _chunk_sq(backend: str, f: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
              vals: torch.Tensor) -> torch.Tensor:
    """(n,) ||f + b - ell||^2 of a chunk's rows, fp32."""
    if backend == "torch":
        e = _error_rows(f, bias)
        return e.scatter_add_(1, ids, -vals).pow_(2).sum(-1)
    n, V = f.shape
    sq = torch.empty(n, dtype=torch.float32, device=f.device)
    k1_p2, block_v = _launch_cfg(ids.shape[1])
    _err_sq_kernel[(n,)](f, bias if bias is not None else f, ids, vals, sq, V, f.stride(0),
                         ids.shape[1], HAS_BIAS=bias is not None, K1_P2=k1_p2, BLOCK_V=block_v)
    return sq


def _chunk_grad(backend: str, f: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                vals: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """(n, V) coef_i * (f + b - ell)_i in f's dtype, written over f (f is a chunk temporary)."""
    if backend == "torch":
        e = _error_rows(f, bias)
        e.scatter_add_(1, ids, -vals).mul_(coef[:, None])
        return f.copy_(e)
    n, V = f.shape
    k1_p2, block_v = _launch_cfg(ids.shape[1])
    _err_grad_kernel[(n,)](f, bias if bias is not None else f, ids, vals, coef, f, V,
                           f.stride(0), f.stride(0), ids.shape[1], HAS_BIAS=bias is not None,
                           K1_P2=k1_p2, BLOCK_V=block_v)
    return f


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


@dataclass
class _Saved:
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None
    grad_b: torch.Tensor | None


class _FusedRMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ids, vals, seq_index, seq_len_cpu, backend, chunk_rows):
        S = seq_len_cpu.numel()
        need = ctx.needs_input_grad
        grad_h = torch.zeros_like(h, dtype=torch.float32) if need[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_b = (torch.zeros_like(bias, dtype=torch.float32)
                  if bias is not None and need[2] else None)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        n_tok = seq_len_cpu.to(h.device, torch.float32)
        for a, b, s0, s1 in sequence_chunks(seq_len_cpu.tolist(), chunk_rows):
            hc = h[a:b]
            f = hc @ weight.t()  # (n, V) in the input dtype: the only chunk-sized buffer
            sq = _chunk_sq(backend, f, bias, ids[a:b], vals[a:b])
            local = seq_index[a:b] - s0
            tot = torch.zeros(s1 - s0, dtype=torch.float32, device=h.device).index_add_(
                0, local, sq)
            rmse = torch.sqrt(tot / n_tok[s0:s1] + _EPS)
            total += rmse.sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            # d loss / d f_i = (f_i - ell_i) / (S * rmse_s * n_s), for token i of sequence s.
            coef = (1.0 / (S * rmse * n_tok[s0:s1]))[local]
            g = _chunk_grad(backend, f, bias, ids[a:b], vals[a:b], coef)
            if grad_h is not None:
                grad_h[a:b] = (g @ weight).float()
            if grad_w is not None:
                grad_w += (g.t() @ hc).float()
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.saved = _Saved(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total / S

    @staticmethod
    def backward(ctx, grad_out):
        s: _Saved = ctx.saved
        dh, dw, db = ctx.dtypes
        out = [None if g is None else (g * grad_out).to(dt)
               for g, dt in ((s.grad_h, dh), (s.grad_w, dw), (s.grad_b, db))]
        ctx.saved = None
        return (*out, None, None, None, None, None, None)


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
