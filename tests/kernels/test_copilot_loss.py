"""Fused Copilot RMSE (never the (N, V) f) against the eager loss on a dense f: the loss, the
zero baseline and every gradient (h, W, b), on odd shapes, float32 and bfloat16."""

import pytest
import torch
import torch.nn.functional as F

from tcp.kernels.copilot_loss import (
    copilot_rmse_loss,
    fused_copilot_rmse_loss,
    sequence_chunks,
)
from tests.kernels.common import BACKENDS, assert_close_scaled, device_for

pytestmark = pytest.mark.kernels


def problem(N: int, d: int, V: int, k: int, S: int, dtype, dev, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g)).to(dtype)
    W = (torch.randn(V, d, generator=g) * d**-0.5 * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.01).to(dtype)
    labels = torch.randint(V, (N,), generator=g)
    top_p, top_i = torch.rand(N, V, generator=g).pow(6).softmax(-1).topk(k, -1)
    top_i[: N // 3, 0] = labels[: N // 3]  # label inside the top-k for some tokens
    cuts = torch.sort(torch.randperm(N - 1, generator=g)[: S - 1] + 1).values.tolist()
    lens = torch.tensor([b - a for a, b in zip([0, *cuts], [*cuts, N], strict=True)])
    seq = torch.repeat_interleave(torch.arange(S), lens)
    return [t.to(dev) for t in (h, W, b, labels, top_i, top_p, seq)]


def eager(h, W, b, labels, top_i, top_p, seq, S):
    return copilot_rmse_loss(F.linear(h, W, b), labels, top_i, top_p, seq, S)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,d,V,k,S", [(37, 123, 50257, 16, 5), (5, 8, 3, 3, 2)])
def test_loss_and_gradients_match_eager(backend, dtype, N, d, V, k, S):
    dev = device_for(backend)
    h, W, b, labels, top_i, top_p, seq = problem(N, d, V, k, S, dtype, dev)
    leaves = [t.requires_grad_() for t in (h, W, b)]
    ref, ref_zero = eager(h, W, b, labels, top_i, top_p, seq, S)
    ref_g = torch.autograd.grad(ref, leaves)
    # a small chunk budget: several chunks, each of whole sequences
    loss, zero = fused_copilot_rmse_loss(h, W, b, labels, top_i, top_p, seq, S, impl=backend,
                                         chunk_mib=0.05)
    got_g = torch.autograd.grad(loss * 3.0, leaves)  # an upstream gradient other than 1
    assert_close_scaled(loss, ref, dtype, "loss")
    torch.testing.assert_close(zero, ref_zero)
    for name, got, want in zip("hWb", got_g, ref_g, strict=True):
        assert got.dtype == dtype
        assert_close_scaled(got, want * 3.0, dtype, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_loss_has_no_cancellation(backend):
    """f = ell + 1e-5 noise: the loss is ~1e-5 while ||f||^2 and ||ell||^2 are ~1; the fused
    loss and its gradient stay within 1e-4 relative of a float64 computation."""
    dev = device_for(backend)
    V = N = 301
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(V, (N,), generator=g)
    top_p, top_i = torch.rand(N, V, generator=g).pow(4).softmax(-1).topk(V, -1)
    ell = torch.zeros(N, V, dtype=torch.float64).scatter_add_(1, top_i, -top_p.double())
    ell[torch.arange(N), labels] += 1
    W = torch.eye(V)  # f = h: the head is the identity, so h can be set to anything
    h = (ell + 1e-5 * torch.randn(N, V, generator=g, dtype=torch.float64)).float()
    seq = torch.zeros(N, dtype=torch.long)
    h64 = h.double().requires_grad_()
    ref = torch.sqrt(((h64 - ell) ** 2).sum(-1).mean() + 1e-12)
    (ref_dh,) = torch.autograd.grad(ref, h64)
    hd = h.to(dev).requires_grad_()
    loss, _ = fused_copilot_rmse_loss(hd, W.to(dev), None, labels.to(dev), top_i.to(dev),
                                      top_p.to(dev), seq.to(dev), 1, impl=backend)
    (dh,) = torch.autograd.grad(loss, hd)
    assert float(ref.detach()) < 1e-3
    assert abs(float(loss) - float(ref)) / float(ref) < 1e-4
    # the gradient goes through one more fp32 matmul (g @ W), which cuBLAS may run at reduced
    # internal precision: 1e-3 relative on an H100, 1e-7 on CPU
    assert float((dh.double().cpu() - ref_dh).abs().max() / ref_dh.abs().max()) < 5e-3


def test_sequence_chunks_keep_sequences_whole():
    assert sequence_chunks([3, 4, 1, 9, 2], 5) == [(0, 3, 0, 1), (3, 8, 1, 3), (8, 17, 3, 4),
                                                   (17, 19, 4, 5)]
    assert sequence_chunks([2, 2], 100) == [(0, 4, 0, 2)]


def test_rejects_tokens_not_grouped_by_sequence():
    h, W = torch.zeros(3, 4), torch.zeros(5, 4)
    ids = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="grouped by sequence"):
        fused_copilot_rmse_loss(h, W, None, torch.zeros(3, dtype=torch.long), ids,
                                torch.zeros(3, 1), torch.tensor([0, 1, 0]), 2, impl="torch")


@pytest.mark.gpu
def test_large_vocabulary_on_gpu():
    """The real CUDA kernels at a LLaMA-3 vocabulary, bf16, against eager."""
    dev = torch.device("cuda")
    h, W, b, labels, top_i, top_p, seq = problem(1000, 512, 128256, 32, 40, torch.bfloat16, dev)
    leaves = [t.requires_grad_() for t in (h, W, b)]
    ref, _ = eager(h, W, b, labels, top_i, top_p, seq, 40)
    ref_g = torch.autograd.grad(ref, leaves)
    loss, _ = fused_copilot_rmse_loss(h, W, b, labels, top_i, top_p, seq, 40, impl="triton")
    got_g = torch.autograd.grad(loss, leaves)
    assert_close_scaled(loss, ref, torch.bfloat16, "loss")
    for name, got, want in zip("hWb", got_g, ref_g, strict=True):
        assert_close_scaled(got, want, torch.bfloat16, f"d{name}")
