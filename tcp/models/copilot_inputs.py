"""The Copilot's teacher-forced inputs: a ragged `MistakeBatch` padded into (B, ...) tensors.

Built where the batch is (the compute device after
`tcp.training.copilot_update.copilot_entries`): only the per-entry lengths go to the host, to
size the padding and compute scatter indices; every per-token tensor is scattered on the device
in a few vectorised ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tcp.mistake_log.record import MistakeBatch, ranges_to_rows


@dataclass
class CopilotInputs:
    """Padded, teacher-forced Copilot inputs built from a `MistakeBatch`."""

    mem: torch.Tensor
    """(B, M, d_P) [X~ ; h] per entry, right-padded."""
    mem_valid: torch.Tensor
    """(B, M) bool real rows."""
    mem_pos: torch.Tensor
    """(B, M) rotary positions of memory rows."""
    mem_first_query: torch.Tensor
    """(B, M) first query index allowed to see the row (X~: 0, h_j: j)."""
    err_ids: torch.Tensor
    """(B, n, k+1) ids of ell_{i-1} (label first, then top-k); row 0 unused."""
    err_vals: torch.Tensor
    """(B, n, k+1) values of ell_{i-1} (+1 at the label, -p at the top-k); row 0 zeros."""
    q_pos: torch.Tensor
    """(B, n) rotary positions of queries."""
    q_valid: torch.Tensor
    """(B, n) bool real target positions."""


def build_inputs(batch: MistakeBatch, device: torch.device | str) -> CopilotInputs:
    """Pad a ragged `MistakeBatch` into `CopilotInputs` on `device` (shifted-right sparse errors).

    Entry b's memory is its P_b rows of X~ (positions 0..P_b-1, visible from query 0) followed
    by its n_b pooled states h_j (positions P_b-1+j, visible from query j on); its queries sit
    at positions P_b-1+j and query j reads the error of target j-1 (query 0: none).
    """
    batch = batch.to(device)
    dev = batch.labels.device
    B = batch.num_entries
    P, n = batch.prompt_lens.cpu().numpy(), batch.target_lens.cpu().numpy()
    M, T = int((P + n).max()), int(n.max())
    d, k1 = batch.h.shape[1], batch.topk_ids.shape[1] + 1

    def on_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dev, non_blocking=True)

    ent = np.arange(B)
    xb, xj = np.repeat(ent, P), ranges_to_rows(np.zeros(B, dtype=np.int64), P)  # X~ rows
    yb, yj = np.repeat(ent, n), ranges_to_rows(np.zeros(B, dtype=np.int64), n)  # target rows
    yp = np.repeat(P, n)
    xb_d, xj_d, yb_d, yj_d = on_dev(xb), on_dev(xj), on_dev(yb), on_dev(yj)
    ycol_d = on_dev(yp + yj)  # memory column of h_j
    mem = torch.zeros(B, M, d, dtype=batch.h.dtype, device=dev)
    mem[xb_d, xj_d] = batch.x_tilde.to(mem.dtype)
    mem[yb_d, ycol_d] = batch.h.to(mem.dtype)
    mem_valid = torch.zeros(B, M, dtype=torch.bool, device=dev)
    mem_valid[xb_d, xj_d] = True
    mem_valid[yb_d, ycol_d] = True
    mem_pos = torch.zeros(B, M, dtype=torch.long, device=dev)
    mem_pos[xb_d, xj_d] = xj_d
    q_pos_flat = on_dev(yj + yp - 1)
    mem_pos[yb_d, ycol_d] = q_pos_flat
    first_q = torch.zeros(B, M, dtype=torch.long, device=dev)
    first_q[yb_d, ycol_d] = yj_d
    # The error of target j feeds query j+1: every target but each entry's last.
    keep = on_dev(yj < np.repeat(n, n) - 1)
    ids = torch.zeros(B, T, k1, dtype=torch.long, device=dev)
    vals = torch.zeros(B, T, k1, dtype=torch.float32, device=dev)
    sp_ids = torch.cat([batch.labels[:, None], batch.topk_ids], dim=1)
    sp_vals = torch.cat([torch.ones(batch.num_tokens, 1, device=dev),
                         -batch.topk_probs.float()], dim=1)
    ids[yb_d[keep], yj_d[keep] + 1] = sp_ids[keep]
    vals[yb_d[keep], yj_d[keep] + 1] = sp_vals[keep]
    q_pos = torch.zeros(B, T, dtype=torch.long, device=dev)
    q_pos[yb_d, yj_d] = q_pos_flat
    q_valid = torch.zeros(B, T, dtype=torch.bool, device=dev)
    q_valid[yb_d, yj_d] = True
    return CopilotInputs(mem=mem, mem_valid=mem_valid, mem_pos=mem_pos, mem_first_query=first_q,
                         err_ids=ids, err_vals=vals, q_pos=q_pos, q_valid=q_valid)
