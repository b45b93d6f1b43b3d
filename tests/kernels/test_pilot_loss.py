"""Fused Pilot cross-entropy + top-k (never the (N, V) logits) against the eager path: loss,
per-token losses, top-k, and every gradient, on odd shapes, float32 and bfloat16."""

import pytest
import torch

from tcp.kernels.pilot_loss import fused_linear_cross_entropy, linear_cross_entropy
from tests.kernels.common import BACKENDS, assert_close_scaled, device_for

pytestmark = pytest.mark.kernels


def problem(N, d, V, dtype, dev, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) * d**-0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    y = torch.randint(V, (N,), generator=g)
    return h.to(dev), W.to(dev), None if b is None else b.to(dev), y.to(dev)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,V,bias", [(37, 123, 50257, False), (21, 16, 7, True)])
def test_matches_eager(backend, dtype, N, d, V, bias):
    dev = device_for(backend)
    h, W, b, y = problem(N, d, V, dtype, dev, bias)
    leaves = [t.requires_grad_() for t in (h, W, b) if t is not None]
    k = 16
    ref = linear_cross_entropy(h, W, y, topk=k, bias=b)
    ref_g = torch.autograd.grad(ref.loss, leaves)
    got = fused_linear_cross_entropy(h, W, y, topk=k, bias=b, impl=backend, chunk_mib=0.05)
    got_g = torch.autograd.grad(got.loss * 0.5, leaves)  # an upstream gradient other than 1
    # bf16 with a bias: eager rounds z + b to bf16, the fused path adds b in fp32
    tol_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert_close_scaled(got.loss, ref.loss, tol_dtype, "loss")
    assert_close_scaled(got.token_loss, ref.token_loss, tol_dtype, "token loss")
    assert got.topk_probs.shape == (N, min(k, V)) and got.topk_ids.dtype == torch.long
    assert_close_scaled(got.topk_probs, ref.topk_probs, tol_dtype, "top-k probabilities")
    # ids agree at every rank whose probability is clear of both neighbours (no near-tie;
    # the last rank's lower neighbour is unknown, so it is left out)
    p = ref.topk_probs
    gap = p[:, :-1] - p[:, 1:]
    rel = 0.05 if dtype == torch.bfloat16 else 1e-4
    inf = torch.full_like(p[:, :1], float("inf"))
    above, below = torch.cat([inf, gap], 1)[:, :-1], gap
    clear = (above > rel * p[:, :-1]) & (below > rel * p[:, :-1])
    assert clear.any()
    assert torch.equal(got.topk_ids[:, :-1][clear], ref.topk_ids[:, :-1][clear])
    for t, got_t, want in zip(leaves, got_g, ref_g, strict=True):
        assert got_t.dtype == t.dtype
        assert_close_scaled(got_t, want * 0.5, tol_dtype, f"grad {tuple(t.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_gives_topk_only(backend):
    dev = device_for(backend)
    h, W, _, y = problem(9, 10, 33, torch.float32, dev, bias=False)
    with torch.no_grad():
        got = fused_linear_cross_entropy(h, W, y, topk=40, impl=backend)
    ref = linear_cross_entropy(h, W, y, topk=40)
    assert got.topk_probs.shape == (9, 33)  # k capped at V: the sparse error is exact
    torch.testing.assert_close(got.topk_probs.sum(-1), torch.ones(9, device=dev))
    torch.testing.assert_close(got.token_loss, ref.token_loss)


@pytest.mark.gpu
def test_large_vocabulary_on_gpu():
    dev = torch.device("cuda")
    h, W, _, y = problem(2000, 1024, 128256, torch.bfloat16, dev, bias=False)
    leaves = [h.requires_grad_(), W.requires_grad_()]
    ref = linear_cross_entropy(h, W, y, topk=32)
    ref_g = torch.autograd.grad(ref.loss, leaves)
    got = fused_linear_cross_entropy(h, W, y, topk=32, impl="triton")
    got_g = torch.autograd.grad(got.loss, leaves)
    assert_close_scaled(got.loss, ref.loss, torch.bfloat16, "loss")
    assert_close_scaled(got.topk_probs, ref.topk_probs, torch.bfloat16, "top-k")
    for got_t, want in zip(got_g, ref_g, strict=True):
        assert_close_scaled(got_t, want, torch.bfloat16, "grad")
