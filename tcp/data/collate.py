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
    longest: int = 0
    """Longest sample in tokens (`[BOS] prompt answer [EOS]`) before any cut."""
    longest_id: int = -1
    """Its sample id (record index)."""
    tokens: int = 0
    """Prompt and answer tokens of all samples, specials excluded: the base of the unk share."""
    unk_tokens: int | None = None
    """Of those, tokens mapped to the tokenizer's unknown token; None when it has none."""
    unk_samples: int = 0
    """Samples with at least one unknown token."""
    unk_ids: list[int] = field(default_factory=list)
    """The first (up to 20) of those samples' ids."""
    unk_text: list[str] = field(default_factory=list)
    """Up to 8 distinct pieces of text that became the unknown token (fast tokenizers only)."""


Encoded = tuple[list[int], list[int]]
"""A record's token ids: (`[BOS] prompt`, `answer [EOS]`)."""


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """`[BOS] prompt` as token ids: the training layout's prompt part, also used for decoding."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_records(records: list[dict[str, str]],
                   tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Every record's (`[BOS] prompt`, `answer [EOS]`) ids, uncut: measured once, then fitted to
    `max_length` by `tokenize_records` (`data.max_length: auto` needs the lengths first)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so answers can end")
    if not records:
        return []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    return [(bos + p, [*a, eos]) for p, a in zip(prompts, answers, strict=True)]


def unknown_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The pieces of `text` that `tokenizer` maps to its unknown token (via offsets; [] for a
    tokenizer without offsets), so a report can say which characters are not covered."""
    unk = tokenizer.unk_token_id
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow (Python) tokenizers have no offsets
        return []
    return [text[s:e] for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
            if i == unk]


def tokenize_records(
    records: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    overlength: str = "skip",
    encoded: list[Encoded] | None = None,
) -> tuple[list[TokenizedSample], TokenizeReport]:
    """Tokenise (prompt, answer) records; returns kept samples and a report that counts the
    over-long (skipped or truncated) samples and the tokens that became the unknown token.
    `encoded`: the records' `encode_records` ids when already computed."""
    if encoded is None:
        encoded = encode_records(records, tokenizer)
    report = TokenizeReport(total=len(records))
    nbos = int(tokenizer.bos_token_id is not None)
    unk = tokenizer.unk_token_id
    if unk is not None:
        report.unk_tokens = 0
    out: list[TokenizedSample] = []
    for i, (p, a) in enumerate(encoded):
        n = len(p) + len(a)
        report.tokens += n - nbos - 1
        if n > report.longest:
            report.longest, report.longest_id = n, i
        if unk is not None:
            _count_unknown(report, i, p[nbos:] + a[:-1], unk)
        if n > max_length:
            room = max_length - len(a) - nbos
            if overlength == "skip" or room < 1:
                report.skipped_overlength += 1
                report.skipped_ids.append(i)
                continue
            p = p[:nbos] + p[len(p) - room:]
            report.truncated += 1
        out.append(TokenizedSample(input_ids=p + a, prompt_len=len(p), sample_id=i))
    report.kept = len(out)
    for i in report.unk_ids:  # which text is not covered: a few examples are enough
        for piece in unknown_text(tokenizer, records[i]["prompt"] + records[i]["answer"]):
            if piece not in report.unk_text and len(report.unk_text) < 8:
                report.unk_text.append(piece)
    return out, report


def _count_unknown(report: TokenizeReport, i: int, ids: list[int], unk: int) -> None:
    """Add sample `i`'s unknown tokens (`ids`: its text tokens) to `report`."""
    n = ids.count(unk)
    if n:
        assert report.unk_tokens is not None
        report.unk_tokens += n
        report.unk_samples += 1
        if len(report.unk_ids) < 20:
            report.unk_ids.append(i)


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
