"""Copilot RMSE loss (sparse target) against a dense reference, values and gradients."""

import pytest
import torch

from tcp.kernels.copilot_loss import copilot_rmse_loss


def dense_reference(f, ell, seq, S):
    sq = ((f.double() - ell.double()) ** 2).sum(-1)
    out = []
    for s in range(S):
        out.append(torch.sqrt(sq[seq == s].mean()))
    return torch.stack(out).mean()


@pytest.mark.parametrize("V,k,label_in_topk", [(11, 3, False), (11, 3, True), (50, 50, False)])
def test_rmse_matches_dense_reference(V, k, label_in_topk):
    g = torch.Generator().manual_seed(V + k)
    N, S = 13, 4
    seq = torch.tensor([0] * 2 + [1] * 5 + [2] * 1 + [3] * 5)
    probs = torch.rand(N, V, generator=g).softmax(-1)
    top_p, top_i = probs.topk(k, -1)
    labels = top_i[:, 0].clone() if label_in_topk else torch.randint(V, (N,), generator=g)
    ell = torch.zeros(N, V).scatter_add_(1, top_i, -top_p)
    ell[torch.arange(N), labels] += 1
    f = (torch.randn(N, V, generator=g) * 0.3).requires_grad_()
    f_ref = f.detach().clone().requires_grad_()
    loss, zero = copilot_rmse_loss(f, labels, top_i, top_p, seq, S)
    ref = dense_reference(f_ref, ell, seq, S)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(f.grad, f_ref.grad.float(), rtol=1e-4, atol=1e-6)
    zero_ref = dense_reference(torch.zeros(N, V), ell, seq, S)
    torch.testing.assert_close(zero.double(), zero_ref, rtol=1e-5, atol=1e-6)


def test_small_loss_is_accurate():
    """f close to ell: the squared error must not cancel into garbage or NaN gradients."""
    V, N = 17, 6
    probs = torch.rand(N, V).softmax(-1)
    top_p, top_i = probs.topk(V, -1)
    labels = torch.randint(V, (N,))
    ell = torch.zeros(N, V).scatter_add_(1, top_i, -top_p)
    ell[torch.arange(N), labels] += 1
    f = (ell + 1e-3 * torch.randn(N, V)).requires_grad_()
    seq = torch.zeros(N, dtype=torch.long)
    loss, _ = copilot_rmse_loss(f, labels, top_i, top_p, seq, 1)
    ref = torch.sqrt(((f.detach() - ell) ** 2).sum(-1).mean())
    assert abs(float(loss.detach()) - float(ref)) < 2e-4
    loss.backward()
    assert torch.isfinite(f.grad).all()
