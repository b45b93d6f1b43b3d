"""Fused greedy decoding (METHOD.md §4): Pilot + Copilot with KV caches, a lambda per row.

Each decoding step: the Pilot gives z_i (and, through the tap, the pooled state h_i); the Copilot,
fed its own previous prediction f_{i-1}, gives f_i; the next token is argmax of
p_hat_i + lambda f_i (fusion='probs') or z_i + lambda f_i (fusion='logits').

A whole lambda grid is decoded in one batch: every prompt is replicated once per lambda (lambda 0
is the Pilot alone), so the grid costs one pass. Under ZeRO-3 every rank must run the same number
of forwards: the loop stops only when all rows on all ranks are finished (one all-reduce a step),
and callers pad their shards to the same number of batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tcp.models.copilot import CopilotCache
from tcp.models.pilot import PilotTap


@dataclass
class DecodeStats:
    """Generation diagnostics (METHOD.md §6), per row."""

    flips: torch.Tensor
    """(R,) decoding steps where the fused choice differs from the Pilot's argmax."""
    max_abs_f: list[float] = field(default_factory=list)
    """max |f| over the vocabulary, per (row, step) of unfinished rows."""
    margin: list[float] = field(default_factory=list)
    """Pilot top-1 minus top-2 probability, per (row, step) of unfinished rows."""


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        mask[r, P - len(p):] = 1
    return ids, mask


def _all_done(done: bool, device: torch.device) -> bool:
    if not dist.is_initialized():
        return done
    t = torch.tensor([0 if done else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t) == 0


def fuse(z: torch.Tensor, f: torch.Tensor, lam: torch.Tensor, fusion: str) -> torch.Tensor:
    """Scores whose argmax is the fused choice: p_hat + lam f ('probs') or z + lam f ('logits').

    z, f: (R, V) fp32; lam: (R,) (0 rows give the Pilot alone).
    """
    if fusion == "probs":
        return torch.softmax(z, dim=-1) + lam[:, None] * f
    return z + lam[:, None] * f


@torch.no_grad()
def fused_generate(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module,
                   prompts: list[list[int]], *, lambdas: list[float], fusion: str,
                   max_new_tokens: int, eos_id: int, pad_id: int, device: torch.device
                   ) -> tuple[list[list[list[int]]], DecodeStats]:
    """Greedy fused decoding of `prompts` once per lambda.

    Returns tokens[l][b] (generated ids of prompt b under lambdas[l], EOS excluded) and the stats
    (rows ordered lambda-major: row = l * B + b).
    """
    B, L = len(prompts), len(lambdas)
    rows = [p for _ in lambdas for p in prompts]
    R = len(rows)
    lam = torch.tensor([lv for lv in lambdas for _ in prompts], dtype=torch.float32,
                       device=device)
    ids, mask = _left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    P = ids.shape[1]
    d = tap.embed.embedding_dim
    valid = mask.bool()
    pidx = valid.nonzero(as_tuple=True)
    last = (torch.arange(R, device=device), torch.full((R,), P - 1, device=device))
    with tap.capture(prompt_index=pidx, target_index=last, hidden_size=d, device=device) as cap:
        out = pilot(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    x_tilde = torch.zeros(R, P, d, dtype=cap.x_tilde.dtype, device=device)
    x_tilde[pidx] = cap.x_tilde
    cache: CopilotCache = copilot(prefix=(x_tilde, valid, pos))
    z, pooled, past = out.logits[:, -1].float(), cap.pooled, out.past_key_values
    cur_pos = pos[:, -1]
    prev_f: torch.Tensor | None = None
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    gen = torch.full((R, max_new_tokens), pad_id, dtype=torch.long, device=device)
    stats = DecodeStats(flips=torch.zeros(R, dtype=torch.long, device=device))
    for i in range(max_new_tokens):
        f = copilot(cache=cache, prev_f=prev_f, h_new=pooled, pos=cur_pos).float()
        nxt = fuse(z, f, lam, fusion).argmax(-1)
        pilot_choice = z.argmax(-1)
        live = ~finished
        stats.flips += ((nxt != pilot_choice) & live).long()
        if live.any():
            p = torch.softmax(z[live], -1).topk(2, dim=-1).values
            stats.margin += (p[:, 0] - p[:, 1]).tolist()
            stats.max_abs_f += f[live].abs().amax(-1).tolist()
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        gen[:, i] = nxt
        finished |= nxt == eos_id
        if _all_done(bool(finished.all()), device) or i == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(R, 1, dtype=mask.dtype, device=device)], dim=1)
        cur_pos = cur_pos + 1
        step_idx = (torch.arange(R, device=device), torch.zeros(R, dtype=torch.long,
                                                                  device=device))
        empty = (torch.zeros(0, dtype=torch.long, device=device),) * 2
        with tap.capture(prompt_index=empty, target_index=step_idx, hidden_size=d,
                         device=device) as cap:
            out = pilot(input_ids=nxt[:, None], attention_mask=mask,
                        position_ids=cur_pos[:, None], past_key_values=past, use_cache=True)
        z, pooled, past, prev_f = out.logits[:, -1].float(), cap.pooled, out.past_key_values, f
    tokens: list[list[list[int]]] = [[[] for _ in range(B)] for _ in range(L)]
    for r, seq in enumerate(gen.tolist()):
        toks = []
        for t in seq:
            if t in (eos_id, pad_id):
                break
            toks.append(t)
        tokens[r // B][r % B] = toks
    return tokens, stats
