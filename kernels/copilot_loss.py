"""Copilot RMSE loss against a sparse error target (METHOD.md §3).

Per sequence s: rmse_s = sqrt( (1/n_s) sum_i ||f_i - ell_i||^2 ), loss = mean_s rmse_s, with
ell_i = onehot(y_i) - sum_k p_ik onehot(t_ik). Expanding the square,

    ||f - ell||^2 = ||f||^2 - 2 (f[y] - sum_k p_k f[t_k]) + ||ell||^2,
    ||ell||^2     = 1 - 2 sum_k p_k [t_k == y] + sum_k p_k^2,

so only k+1 entries of each f_i are gathered and the dense ell never exists. This module holds
the pure-torch reference (`impl="torch"`), which takes a dense f; the fused kernel that also
avoids the dense f is a separate backend added behind the same function.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def error_sq_norm(labels: torch.Tensor, topk_ids: torch.Tensor,
                  topk_probs: torch.Tensor) -> torch.Tensor:
    """(N,) ||ell_i||^2 of the sparse errors (fp32)."""
    p = topk_probs.float()
    hit = (topk_ids == labels[:, None]).float()
    return 1.0 - 2.0 * (p * hit).sum(-1) + (p * p).sum(-1)


def sq_error(f: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
             topk_probs: torch.Tensor) -> torch.Tensor:
    """(N,) ||f_i - ell_i||^2 for dense f (N, V), fp32 accumulation, clamped at 0."""
    ff = f.float()
    f_y = ff.gather(1, labels[:, None])[:, 0]
    f_t = ff.gather(1, topk_ids)
    dot = f_y - (topk_probs.float() * f_t).sum(-1)
    sq = ff.pow(2).sum(-1) - 2.0 * dot + error_sq_norm(labels, topk_ids, topk_probs)
    return sq.clamp_min(0.0)


def per_sequence_rmse(sq: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """(S,) sqrt(mean over each sequence's tokens of sq), seq_index (N,) in [0, S)."""
    tot = torch.zeros(num_seqs, dtype=sq.dtype, device=sq.device).index_add_(0, seq_index, sq)
    cnt = torch.zeros(num_seqs, dtype=sq.dtype, device=sq.device).index_add_(
        0, seq_index, torch.ones_like(sq))
    return torch.sqrt(tot / cnt.clamp_min(1.0) + _EPS)


def copilot_rmse_loss(f: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor,
                      topk_probs: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                      *, impl: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sequence RMSE and, for diagnostics, the zero-baseline RMSE (f = 0).

    Args:
        f: (N, V) predicted errors at the N target tokens.
        labels: (N,) y_i. topk_ids, topk_probs: (N, k). seq_index: (N,) sequence of each token.
    Returns:
        (loss, zero_baseline): scalars; the baseline is detached.
    """
    if impl != "torch":
        raise ValueError(f"copilot_rmse_loss: impl={impl!r} is not available; use impl='torch'")
    sq = sq_error(f, labels, topk_ids, topk_probs)
    loss = per_sequence_rmse(sq, seq_index, num_seqs).mean()
    with torch.no_grad():
        base = per_sequence_rmse(error_sq_norm(labels, topk_ids, topk_probs), seq_index,
                                 num_seqs).mean()
    return loss, base
