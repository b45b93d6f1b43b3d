"""Pilot outputs -> Mistake Log entries (docs/method.md §3)."""

from __future__ import annotations

import torch

from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths
from tcp.models.pilot import PilotStep


@torch.no_grad()
def collect(out: PilotStep, *, topk: int, step: int, rank: int, sample_id: torch.Tensor,
            storage_dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> MistakeBatch:
    """Build one entry per sample from a teacher-forced Pilot forward.

    The top-k is the Pilot's (`pilot_forward(head=HeadOptions(topk=...))`, in fp32 from
    softmax(z_i)), or taken here from `target_logits`; k is capped at the vocabulary size, where
    the sparse error becomes exact.
    """
    if out.topk_probs is not None and out.topk_ids is not None:
        top_p, top_i = out.topk_probs[:, :topk], out.topk_ids[:, :topk]
    elif out.target_logits is not None:
        probs = torch.softmax(out.target_logits.detach().float(), dim=-1)
        top_p, top_i = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    else:
        raise ValueError("collect: the Pilot step has neither top-k nor logits; call "
                         "pilot_forward with head=HeadOptions(topk=...)")
    residual = (1.0 - top_p.sum(-1)).clamp_min(0.0)
    B = out.prompt_len.numel()
    return MistakeBatch(
        x_tilde=out.x_tilde.to(storage_dtype),
        x_offsets=offsets_from_lengths(out.prompt_len.long()),
        h=out.pooled.to(storage_dtype),
        y_offsets=offsets_from_lengths(out.target_len.long()),
        labels=out.labels.long(),
        topk_ids=top_i.long(),
        topk_probs=top_p,
        residual=residual,
        step=torch.full((B,), step, dtype=torch.long),
        sample_id=sample_id.long().cpu(),
        rank=torch.full((B,), rank, dtype=torch.long),
        loss=out.sample_loss.float(),
    ).to(device)
