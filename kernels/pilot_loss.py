"""The Pilot's cross-entropy on target tokens, fused with the LM head, plus top-k extraction.

loss = mean_i ( logsumexp(z_i) - z_i[y_i] ),  z_i = W h_i (+ b), for the N target tokens,
and for the Mistake Log the top-k probabilities softmax(z_i) and their ids (docs/method.md §3).

`fused_linear_cross_entropy` never holds the (N, V) logits: tokens go in chunks of `rows` rows,
each chunk's logits are one (rows, V) buffer that becomes, in place, the gradient
softmax(z) - onehot(y), so dh and dW are computed during the forward (cuBLAS/MKL matmuls) and the
backward only scales them by the upstream gradient (the recipe of Liger-Kernel's fused linear
cross-entropy). Per-chunk row work (logsumexp, loss, gradient) is a Triton kernel pair
(`impl="triton"`) or torch ops (`impl="torch"`); top-k is `torch.topk` on the chunk's logits,
whose order is the order of the probabilities.

`linear_cross_entropy` is the eager reference (full logits), and the unfused training path.

Under ZeRO-3 the LM head weight is partitioned; call these from the forward of the module that
owns the weight (see `tcp.models.lm_head.FusedLMHead`), where DeepSpeed has gathered it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tcp.kernels.chunking import LinearGrads, rows_per_chunk, with_bias_fp32
from tcp.kernels.dispatch import resolve

try:  # Triton is optional on CPU-only hosts; `dispatch.resolve` never picks it there.
    import triton
    import triton.language as tl

    from tcp.kernels.chunking import load_row_block
except Exception:  # pragma: no cover - exercised on hosts without triton
    triton = None


@dataclass
class CEResult:
    """What the Pilot's loss gives the trainer and the Mistake Log."""

    loss: torch.Tensor
    """Scalar mean cross-entropy over the N tokens (with grad)."""
    token_loss: torch.Tensor
    """(N,) fp32 per-token cross-entropy (detached)."""
    topk_probs: torch.Tensor
    """(N, k) fp32 largest probabilities of softmax(z_i), descending (detached)."""
    topk_ids: torch.Tensor
    """(N, k) int64 their token ids."""


# ----------------------------------------------------------------------------- eager reference
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         topk: int, bias: torch.Tensor | None = None) -> CEResult:
    """The eager path: full (N, V) logits in the input dtype, loss and top-k in fp32."""
    logits = F.linear(hidden, weight, bias)
    return logits_cross_entropy(logits, labels, topk=topk)


def logits_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, topk: int,
                         chunk_mib: float = 64.0) -> CEResult:
    """Loss and top-k from logits that already exist (N, V).

    Without autograd (evaluation) the rows go in chunks of about `chunk_mib` MiB of fp32, so
    nothing besides the logits themselves is (N, V); with autograd it is the eager reference.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return _logits_cross_entropy_chunked(logits, labels, topk=topk, chunk_mib=chunk_mib)
    z = logits.float()
    tok = F.cross_entropy(z, labels, reduction="none")
    k = min(topk, z.shape[-1])
    with torch.no_grad():
        if k > 0:
            top_p, top_i = torch.softmax(z.detach(), dim=-1).topk(k, dim=-1)
        else:
            top_p = torch.empty(z.shape[0], 0, device=z.device)
            top_i = torch.empty(z.shape[0], 0, dtype=torch.long, device=z.device)
    return CEResult(loss=tok.mean(), token_loss=tok.detach(), topk_probs=top_p,
                    topk_ids=top_i.long())


@torch.no_grad()
def _logits_cross_entropy_chunked(logits: torch.Tensor, labels: torch.Tensor, *, topk: int,
                                  chunk_mib: float) -> CEResult:
    N, V = logits.shape
    k = min(topk, V)
    tok = torch.empty(N, dtype=torch.float32, device=logits.device)
    top_p = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    top_i = torch.empty(N, k, dtype=torch.long, device=logits.device)
    step = rows_per_chunk(V, chunk_mib)
    for r0 in range(0, N, step):
        z = logits[r0:r0 + step].float()
        lse = torch.logsumexp(z, dim=-1)
        tok[r0:r0 + step] = lse - z.gather(1, labels[r0:r0 + step, None])[:, 0]
        if k > 0:
            zk, ik = z.topk(k, dim=-1)  # softmax is monotone: top-k of z = top-k of p
            top_p[r0:r0 + step] = (zk - lse[:, None]).exp()
            top_i[r0:r0 + step] = ik
    return CEResult(loss=tok.mean(), token_loss=tok, topk_probs=top_p, topk_ids=top_i)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _lse_part_kernel(z_ptr, bias_ptr, max_ptr, sum_ptr, V, stride_z, n_blocks,
                         HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
        # Program (row, block): the block's max and sum of exp(x - max), for the host to
        # combine in a fixed order (deterministic, no atomics).
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        x, _, _ = load_row_block(z_ptr, bias_ptr, row, stride_z, blk, V, float("-inf"),
                                 HAS_BIAS, BLOCK_V)
        mx = tl.max(x, axis=0)  # finite: every block holds at least one real column
        tl.store(max_ptr + row * n_blocks + blk, mx)
        tl.store(sum_ptr + row * n_blocks + blk, tl.sum(tl.exp(x - mx), axis=0))

    @triton.jit
    def _ce_grad_kernel(z_ptr, bias_ptr, labels_ptr, lse_ptr, V, stride_z, scale,
                        HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr):
        # z <- scale * (softmax(z) - onehot(y)), in place: each element is read, then written,
        # by one program.
        row = tl.program_id(0).to(tl.int64)
        x, cols, m = load_row_block(z_ptr, bias_ptr, row, stride_z, tl.program_id(1), V, 0.0,
                                    HAS_BIAS, BLOCK_V)
        lse = tl.load(lse_ptr + row)
        y = tl.load(labels_ptr + row)
        g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
        tl.store(z_ptr + row * stride_z + cols, (g * scale).to(z_ptr.dtype.element_ty), mask=m)


_BLOCK_V = 2048


# ----------------------------------------------------------------------------- chunk row work
def _chunk_lse(backend: str, z: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, token loss), (n,) fp32 each, of a chunk's logits z (n, V) (+ bias)."""
    zy = z.gather(1, y[:, None])[:, 0].float()
    if bias is not None:
        zy = zy + bias.float()[y]
    if backend == "torch":
        lse = torch.logsumexp(with_bias_fp32(z, bias), dim=-1)
        return lse, lse - zy
    n, V = z.shape
    n_blocks = triton.cdiv(V, _BLOCK_V)
    mx = torch.empty(n, n_blocks, dtype=torch.float32, device=z.device)
    sm = torch.empty_like(mx)
    _lse_part_kernel[(n, n_blocks)](z, bias if bias is not None else z, mx, sm, V, z.stride(0),
                                    n_blocks, HAS_BIAS=bias is not None, BLOCK_V=_BLOCK_V)
    top = mx.max(1).values
    lse = top + torch.log((sm * torch.exp(mx - top[:, None])).sum(1))
    return lse, lse - zy


def _chunk_grad(backend: str, z: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                lse: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (softmax(z) - onehot(y)) written over z (a chunk temporary)."""
    rows = torch.arange(z.shape[0], device=z.device)
    if backend == "torch" and z.dtype == torch.float32 and bias is None:
        z.sub_(lse[:, None]).exp_()  # in place: z is a chunk temporary
        z[rows, y] -= 1.0
        return z.mul_(scale)
    if backend == "torch":
        g = torch.exp(with_bias_fp32(z, bias) - lse[:, None])
        g[rows, y] -= 1.0
        return z.copy_(g.mul_(scale))
    n, V = z.shape
    _ce_grad_kernel[(n, triton.cdiv(V, _BLOCK_V))](z, bias if bias is not None else z, y, lse,
                                                   V, z.stride(0), float(scale),
                                                   HAS_BIAS=bias is not None, BLOCK_V=_BLOCK_V)
    return z


# ----------------------------------------------------------------------------- fused op
class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk, backend, rows, side):
        N = hidden.shape[0]
        grads = LinearGrads(hidden, weight, bias, ctx.needs_input_grad)
        k = min(topk, weight.shape[0])
        token_loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
        top_p = torch.empty(N, k, dtype=torch.float32, device=hidden.device)
        top_i = torch.empty(N, k, dtype=torch.long, device=hidden.device)
        for a in range(0, N, rows):
            b = min(N, a + rows)
            hc, y = hidden[a:b], labels[a:b]
            z = hc @ weight.t()  # (n, V): the only chunk-sized buffer
            lse, token_loss[a:b] = _chunk_lse(backend, z, bias, y)
            if k:
                zt, it = (z if bias is None else z.float() + bias.float()).topk(k, dim=-1)
                top_p[a:b] = torch.exp(zt.float() - lse[:, None])
                top_i[a:b] = it
            if grads.needed:
                grads.add(a, b, _chunk_grad(backend, z, bias, y, lse, 1.0 / N), hc, weight)
        ctx.grads = grads
        side.extend([token_loss, top_p, top_i])
        return token_loss.sum() / N

    @staticmethod
    def backward(ctx, grad_out):
        return (*ctx.grads.scaled(grad_out), None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               *, topk: int, bias: torch.Tensor | None = None,
                               impl: str | None = "auto", chunk_mib: float = 64.0) -> CEResult:
    """`linear_cross_entropy` without the (N, V) logits.

    Args:
        hidden: (N, d) final hidden states at the target-producing positions.
        weight: (V, d), bias: (V,) or None: the LM head.
        labels: (N,) target tokens. topk: how many probabilities to return per token.
        impl: "auto" | "torch" | "triton" (see `tcp.kernels.dispatch`).
        chunk_mib: size of the one (rows, V) logits buffer; rows = chunk_mib / (V * 4 bytes).
    """
    if hidden.shape[0] != labels.numel():
        raise ValueError("fused_linear_cross_entropy: hidden and labels need N rows each")
    if hidden.shape[0] == 0:
        raise ValueError("fused_linear_cross_entropy: no target tokens")
    backend = resolve(impl, hidden.device)
    side: list[torch.Tensor] = []
    loss = _FusedLinearCE.apply(hidden, weight, bias, labels.long().contiguous(), topk, backend,
                                rows_per_chunk(weight.shape[0], chunk_mib), side)
    token_loss, top_p, top_i = side
    return CEResult(loss=loss, token_loss=token_loss, topk_probs=top_p, topk_ids=top_i)
