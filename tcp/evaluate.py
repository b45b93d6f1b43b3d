"""Pilot vs Pilot+Copilot: lambda chosen on validation, test scored once; METHOD.md §6 diagnostics.

All functions here are collective under ZeRO-3: every rank calls them with its shard, shards are
padded to the same number of batches, and counts are summed across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from tcp.data.collate import TokenizedSample, collate, encode_prompt
from tcp.generate import DecodeOptions, cut_at_stop, fuse, fused_generate
from tcp.kernels.copilot_loss import copilot_rmse_loss
from tcp.mistake_log.collect import collect
from tcp.models.copilot import build_inputs
from tcp.models.pilot import PilotTap, pilot_forward
from tcp.tasks import AnswerScorer


def _sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _shard_batches(samples: list[Any], *, rank: int, world: int, batch_size: int
                   ) -> list[tuple[list[Any], int]]:
    """This rank's batches as (items, n_real); every rank gets the same number of batches."""
    shard = samples[rank::world]
    n_batches = math.ceil(math.ceil(len(samples) / world) / batch_size)
    out = []
    for i in range(n_batches):
        items = shard[i * batch_size:(i + 1) * batch_size]
        n_real = len(items)
        if n_real == 0:  # keep ranks in step: run a throw-away batch
            items = samples[:1]
        out.append((items, n_real))
    return out


@dataclass
class GenResult:
    """Per-lambda accuracy and generation diagnostics on one split."""

    lambdas: list[float]
    accuracy: list[float]
    flips: list[int]
    """Decoding steps flipped by the Copilot, per lambda."""
    flipped_rows_correct: list[int]
    """Answers with at least one flip that ended correct, per lambda."""
    flipped_rows: list[int]
    """Answers with at least one flip, per lambda."""
    max_abs_f_median: float
    pilot_margin_median: float
    n: int
    answer_format: str = "exact"
    """The format answers were scored in (tcp.tasks)."""


@torch.no_grad()
def generation_eval(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module | None,
                    records: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, *,
                    lambdas: list[float], opts: DecodeOptions, batch_size: int, rank: int,
                    world: int, device: torch.device, answer_format: str = "auto") -> GenResult:
    """Decode every record once per lambda (0.0 = Pilot alone) and score the answers.

    `answer_format` 'auto' is resolved on this split's golds (the same on every rank).
    """
    scorer = AnswerScorer.for_golds(answer_format, [r["answer"] for r in records])
    L = len(lambdas)
    correct = [0.0] * L
    flips, frows, frows_ok = [0.0] * L, [0.0] * L, [0.0] * L
    n_total = 0.0
    fmax, margins = [], []
    indexed = list(enumerate(records))
    decode = tokenizer.decode
    for items, n_real in _shard_batches(indexed, rank=rank, world=world, batch_size=batch_size):
        prompts = [encode_prompt(tokenizer, r["prompt"]) for _, r in items]
        toks, st = fused_generate(pilot, tap, copilot, prompts, lambdas=lambdas, opts=opts,
                                  eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                  device=device, decode=decode)
        B = len(items)
        flips_rows = st.flips.view(L, B).cpu()
        texts = [[cut_at_stop(decode(toks[li][b]), opts.stop) for b in range(B)]
                 for li in range(L)]
        for li in range(L):
            for b in range(n_real):
                ok = scorer.correct(texts[li][b], items[b][1]["answer"])
                correct[li] += ok
                flips[li] += int(flips_rows[li, b])
                if flips_rows[li, b] > 0:
                    frows[li] += 1
                    frows_ok[li] += ok
        n_total += n_real
        if n_real:
            fmax += st.max_abs_f
            margins += st.margin
    tot = _sum([n_total, *correct, *flips, *frows, *frows_ok], device)
    n = tot[0]
    acc = [c / max(n, 1) for c in tot[1:1 + L]]
    fl = [int(x) for x in tot[1 + L:1 + 2 * L]]
    fr = [int(x) for x in tot[1 + 2 * L:1 + 3 * L]]
    fro = [int(x) for x in tot[1 + 3 * L:1 + 4 * L]]
    return GenResult(lambdas=list(lambdas), accuracy=acc, flips=fl, flipped_rows=fr,
                     flipped_rows_correct=fro,
                     max_abs_f_median=_median(fmax), pilot_margin_median=_median(margins),
                     n=int(n), answer_format=scorer.format)


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")


@torch.no_grad()
def teacher_forced_diagnostics(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module,
                               samples: list[TokenizedSample], *, pad_id: int, vocab_size: int,
                               lambdas: list[float], fusion: str, batch_size: int, rank: int,
                               world: int, device: torch.device) -> dict[str, Any]:
    """Copilot RMSE vs the zero baseline, cos(f_i, ell_i), fixes/breaks per lambda (METHOD §6).

    Uses the exact dense error ell_i = onehot(y_i) - p_hat_i (all of p_hat, not the top-k).
    """
    L = len(lambdas)
    acc = {"rmse": 0.0, "zero": 0.0, "seqs": 0.0, "cos": 0.0, "tokens": 0.0,
           "pilot_correct": 0.0}
    fixes, breaks = [0.0] * L, [0.0] * L
    for items, n_real in _shard_batches(samples, rank=rank, world=world, batch_size=batch_size):
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        out = pilot_forward(pilot, tap, batch)
        entries = collect(out, topk=vocab_size, step=0, rank=rank, sample_id=batch["sample_id"],
                          device=device)
        inputs = build_inputs(entries, device)
        f = copilot(inputs)[inputs.q_valid].float()
        seq = torch.repeat_interleave(torch.arange(entries.num_entries, device=device),
                                      entries.target_lens.to(device))
        real_tok = seq < n_real
        if n_real == 0:
            continue
        sub = entries.select(list(range(n_real)))
        fr = f[real_tok]
        rmse, zero = copilot_rmse_loss(fr, sub.labels, sub.topk_ids, sub.topk_probs,
                                       seq[real_tok], n_real)
        acc["rmse"] += float(rmse) * n_real
        acc["zero"] += float(zero) * n_real
        acc["seqs"] += n_real
        z = out.target_logits.float()[real_tok]
        p_hat = torch.softmax(z, -1)
        ell = -p_hat
        ell[torch.arange(ell.shape[0], device=device), sub.labels] += 1.0
        acc["cos"] += float(torch.nn.functional.cosine_similarity(fr, ell, dim=-1, eps=1e-12)
                            .sum())
        acc["tokens"] += fr.shape[0]
        pilot_ok = p_hat.argmax(-1) == sub.labels
        acc["pilot_correct"] += float(pilot_ok.sum())
        for li, lv in enumerate(lambdas):
            lam = torch.full((fr.shape[0],), lv, device=device)
            fused_ok = fuse(z, fr, lam, fusion).argmax(-1) == sub.labels
            fixes[li] += float((fused_ok & ~pilot_ok).sum())
            breaks[li] += float((~fused_ok & pilot_ok).sum())
    keys = list(acc)
    tot = _sum([acc[k] for k in keys] + fixes + breaks, device)
    s = dict(zip(keys, tot[:len(keys)], strict=True))
    fx, br = tot[len(keys):len(keys) + L], tot[len(keys) + L:]
    seqs, toks = max(s["seqs"], 1), max(s["tokens"], 1)
    rmse, zero = s["rmse"] / seqs, s["zero"] / seqs
    return {
        "copilot_rmse": rmse,
        "zero_rmse": zero,
        "rmse_ratio": rmse / zero if zero > 0 else float("nan"),
        "cosine": s["cos"] / toks,
        "pilot_token_accuracy": s["pilot_correct"] / toks,
        "tokens": int(s["tokens"]),
        "fixes": {str(lv): int(x) for lv, x in zip(lambdas, fx, strict=True)},
        "breaks": {str(lv): int(x) for lv, x in zip(lambdas, br, strict=True)},
    }


def choose_lambda(val: GenResult) -> tuple[float, float]:
    """Best lambda on validation (index 0 is the Pilot alone and is not a candidate).

    Ties go to the smaller lambda: the smaller correction that does as well.
    Returns (lambda, its validation accuracy).
    """
    best = max(range(1, len(val.lambdas)), key=lambda i: (val.accuracy[i], -val.lambdas[i]))
    return val.lambdas[best], val.accuracy[best]
