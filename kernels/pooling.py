"""Layer-mean pooling of the Pilot's hidden states at the target-producing positions
(docs/method.md §3).

h_n = (1/L) sum_l states_l[rows_n], accumulated in fp32, written in the Mistake Log's storage dtype.
The layers arrive one at a time (from forward hooks), so the op is incremental: each layer is
gathered and added into one (N, d) fp32 accumulator, and the last layer writes the mean straight
into the output dtype. No (L, N, d) stack and no gathered (N, d) copy per layer ever exists.

Pooling is bookkeeping for the log (the states are detached), so the op has no backward.

Backends: `impl="triton"` (one fused gather-convert-accumulate kernel per layer) and
`impl="torch"` (the reference: index_select, cast, add).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tcp.kernels.dispatch import resolve

try:  # Triton is optional on CPU-only hosts; `dispatch.resolve` never picks it there.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised on hosts without triton
    triton = None


if triton is not None:

    @triton.jit
    def _pool_layer_kernel(acc_ptr, src_ptr, rows_ptr, out_ptr, n_rows, dim, src_stride, scale,
                           FIRST: tl.constexpr, FINAL: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_n = offs_n < n_rows
        mask = mask_n[:, None] & (offs_d[None, :] < dim)
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        x = tl.load(src_ptr + rows[:, None] * src_stride + offs_d[None, :], mask=mask, other=0.0)
        acc = x.to(tl.float32)
        acc_offs = offs_n[:, None].to(tl.int64) * dim + offs_d[None, :]
        if not FIRST:  # the first layer initialises the accumulator: no read of zeros
            acc += tl.load(acc_ptr + acc_offs, mask=mask, other=0.0)
        if FINAL:
            tl.store(out_ptr + acc_offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(acc_ptr + acc_offs, acc, mask=mask)


def _rows2d(states: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (R, d) with unit stride along d (a view when the states allow it)."""
    flat = states.reshape(-1, states.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def pool_layer_(acc: torch.Tensor, states: torch.Tensor, rows: torch.Tensor, *, first: bool,
                final_scale: float | None = None, out: torch.Tensor | None = None,
                impl: str | None = "auto") -> None:
    """Add one layer's rows into the accumulator; on the final layer, write the mean to `out`.

    Args:
        acc: (N, d) float32 accumulator (overwritten when `first`).
        states: (B, T, d) or (R, d) hidden states of one layer, any float dtype.
        rows: (N,) int64 flat row indices into `states.reshape(-1, d)`.
        first: this is the first layer (the accumulator holds garbage).
        final_scale: on the final layer, 1/L; the result `acc * final_scale` goes to `out`.
        out: (N, d) output in the storage dtype; required with `final_scale`.
    """
    src = _rows2d(states)
    n, d = acc.shape
    if src.shape[1] != d or acc.dtype != torch.float32:
        raise ValueError(f"pool_layer_: acc must be float32 (N, {src.shape[1]}), got "
                         f"{tuple(acc.shape)} {acc.dtype}")
    if final_scale is not None and (out is None or out.shape != acc.shape):
        raise ValueError("pool_layer_: the final layer needs `out` of the accumulator's shape")
    if resolve(impl, acc.device) == "torch":
        x = src.index_select(0, rows).float()
        if not first:
            x += acc
        if final_scale is None:
            acc.copy_(x)
        else:
            out.copy_(x.mul_(final_scale))  # type: ignore[union-attr]
        return
    if n == 0:
        return
    block_d = min(triton.next_power_of_2(d), 256)
    block_n = max(1, 4096 // block_d)
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    _pool_layer_kernel[grid](
        acc, src, rows, out if out is not None else acc, n, d, src.stride(0),
        float(final_scale or 1.0), FIRST=first, FINAL=final_scale is not None,
        BLOCK_N=block_n, BLOCK_D=block_d,
    )


def layer_mean_pool(states: Sequence[torch.Tensor], rows: torch.Tensor, *,
                    out_dtype: torch.dtype = torch.float32,
                    impl: str | None = "auto") -> torch.Tensor:
    """(N, d) mean over `states` (L tensors of (B, T, d) or (R, d)) of the rows `rows` (N,).

    The one-shot form of `pool_layer_`, for callers that hold every layer (tests, benchmarks).
    """
    if not states:
        raise ValueError("layer_mean_pool: no layer states given")
    d = states[0].shape[-1]
    acc = torch.empty(rows.numel(), d, dtype=torch.float32, device=rows.device)
    out = torch.empty(rows.numel(), d, dtype=out_dtype, device=rows.device)
    last = len(states) - 1
    for i, s in enumerate(states):
        pool_layer_(acc, s, rows, first=i == 0, final_scale=1.0 / len(states) if i == last
                    else None, out=out if i == last else None, impl=impl)
    return out
