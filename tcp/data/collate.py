"""Tokenisation and collation: prompt + answer + EOS, loss on answer tokens only.

Layout of one sample: `[BOS] prompt answer [EOS]`. The *targets* are the answer tokens and EOS;
target i is produced (predicted) at position `prompt_len + i - 1`. Over-long samples are skipped or
truncated (prompt cut from the left, BOS kept) and always counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class TokenizedSample:
    """One tokenised sample."""

    input_ids: list[int]
    prompt_len: int
    """Tokens before the first target (BOS + prompt)."""
    sample_id: int


@dataclass
class TokenizeReport:
    """What tokenisation did to a split (reported, never silent)."""

    total: int = 0
    kept: int = 0
    skipped_overlength: int = 0
    truncated: int = 0
    skipped_ids: list[int] = field(default_factory=list)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """`[BOS] prompt` as token ids: the training layout's prompt part, also used for decoding."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def tokenize_records(
    records: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    overlength: str = "skip",
) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenise (prompt, answer) records; returns kept samples and a report."""
    report = TokenizeReport(total=len(records))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so answers can end")
    out: list[TokenizedSample] = []
    for i, rec in enumerate(records):
        p = encode_prompt(tokenizer, rec["prompt"])
        a = tokenizer(rec["answer"], add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(a) > max_length:
            room = max_length - len(a) - len(bos)
            if overlength == "skip" or room < 1:
                report.skipped_overlength += 1
                report.skipped_ids.append(i)
                continue
            p = bos + p[len(p) - room:]
            report.truncated += 1
        out.append(TokenizedSample(input_ids=p + a, prompt_len=len(p), sample_id=i))
    report.kept = len(out)
    return out, report


def collate(samples: list[TokenizedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch.

    Returns:
        input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 off-target (HF
        convention: labels[t] is predicted at t-1), prompt_len (B,), target_len (B,),
        sample_id (B,).
    """
    T = max(len(s.input_ids) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        mask[b, :n] = 1
        labels[b, s.prompt_len:n] = ids[b, s.prompt_len:n]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_len": torch.tensor([s.prompt_len for s in samples]),
        "target_len": torch.tensor([len(s.input_ids) - s.prompt_len for s in samples]),
        "sample_id": torch.tensor([s.sample_id for s in samples]),
    }


def batch_indices(*, seed: int, step: int, rank: int, world_size: int, micro_batch_size: int,
                  num_samples: int) -> list[int]:
    """Indices of rank `rank`'s micro-batch at `step`: a pure function, deterministic on resume.

    The stream is an endless concatenation of per-epoch permutations (seeded by seed and epoch);
    global batch `step` is the slice [step*G, (step+1)*G) with G = micro_batch_size*world_size,
    and rank r takes the r-th contiguous part of it.
    """
    G = micro_batch_size * world_size
    start = step * G + rank * micro_batch_size
    perms: dict[int, list[int]] = {}
    idx = []
    for pos in range(start, start + micro_batch_size):
        epoch, off = divmod(pos, num_samples)
        if epoch not in perms:  # a micro-batch spans at most a couple of epochs
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_samples, generator=g).tolist()
        idx.append(perms[epoch][off])
    return idx
