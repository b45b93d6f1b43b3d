"""`build_inputs` (vectorised, on the batch's device) equals the per-entry padding it replaced,
field by field, on ragged batches (including entries with one target and one prompt row)."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from tcp.mistake_log.record import MistakeBatch
from tcp.models.copilot_inputs import CopilotInputs, build_inputs
from tests.helpers import fake_entries


def reference_inputs(batch: MistakeBatch) -> CopilotInputs:
    """The padding written out entry by entry (the former implementation), on the CPU."""
    B = batch.num_entries
    P, n = batch.prompt_lens, batch.target_lens
    M, T, d, k1 = int((P + n).max()), int(n.max()), batch.h.shape[1], batch.topk_ids.shape[1] + 1
    out = CopilotInputs(
        mem=torch.zeros(B, M, d, dtype=batch.h.dtype), mem_valid=torch.zeros(B, M, dtype=bool),
        mem_pos=torch.zeros(B, M, dtype=torch.long),
        mem_first_query=torch.zeros(B, M, dtype=torch.long),
        err_ids=torch.zeros(B, T, k1, dtype=torch.long), err_vals=torch.zeros(B, T, k1),
        q_pos=torch.zeros(B, T, dtype=torch.long), q_valid=torch.zeros(B, T, dtype=bool))
    xo, yo = batch.x_offsets, batch.y_offsets
    sp_ids = torch.cat([batch.labels[:, None], batch.topk_ids], dim=1)
    sp_vals = torch.cat([torch.ones(batch.num_tokens, 1), -batch.topk_probs.float()], dim=1)
    for b in range(B):
        p, m = int(P[b]), int(n[b])
        out.mem[b, :p] = batch.x_tilde[xo[b]:xo[b + 1]]
        out.mem[b, p:p + m] = batch.h[yo[b]:yo[b + 1]]
        out.mem_valid[b, :p + m] = True
        out.mem_pos[b, :p] = torch.arange(p)
        out.mem_pos[b, p:p + m] = torch.arange(m) + p - 1
        out.mem_first_query[b, p:p + m] = torch.arange(m)
        out.err_ids[b, 1:m] = sp_ids[yo[b]:yo[b + 1] - 1]
        out.err_vals[b, 1:m] = sp_vals[yo[b]:yo[b + 1] - 1]
        out.q_pos[b, :m] = torch.arange(m) + p - 1
        out.q_valid[b, :m] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_inputs_equal_the_per_entry_padding(seed):
    batch = MistakeBatch.cat([fake_entries(s, n=5, seed=seed) for s in range(3)], device="cpu")
    assert int(batch.target_lens.max()) > int(batch.target_lens.min())  # ragged
    got, want = build_inputs(batch, "cpu"), reference_inputs(batch)
    for f in fields(CopilotInputs):
        torch.testing.assert_close(getattr(got, f.name), getattr(want, f.name), rtol=0, atol=0,
                                   msg=f.name)

