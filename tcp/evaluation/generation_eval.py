"""Decode a split with the Pilot alone and at each λ, and score it: accuracy, flips, fixes and
breaks against the Pilot, truncation, per-example rows (docs/method.md §7 diagnostics).

All functions here are collective under ZeRO-3: every rank calls them with its shard, shards are
padded to the same number of batches, and counts are summed across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tcp.data.collate import encode_prompt
from tcp.evaluation.answer_scoring import AnswerScorer
from tcp.evaluation.decoding import DecodeOptions, cut_at_stop, fused_generate
from tcp.evaluation.predictions import prediction_row
from tcp.evaluation.shards import shard_batches
from tcp.models.pilot import PilotTap
from tcp.runtime.collective import sum_across_ranks


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
    """The format answers were scored in (tcp.evaluation.answer_scoring)."""
    truncated: list[int] = field(default_factory=list)
    """Generations that ended on the budget without EOS or a stop string, per lambda."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """This rank's predictions.jsonl rows (tcp.evaluation.predictions), when asked for."""
    fixes: list[int] = field(default_factory=list)
    """Answers right with this lambda and wrong with the Pilot alone (index 0), per lambda."""
    breaks: list[int] = field(default_factory=list)
    """Answers wrong with this lambda and right with the Pilot alone (index 0), per lambda."""


@torch.no_grad()
def generation_eval(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module | None,
                    records: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, *,
                    lambdas: list[float], opts: DecodeOptions, batch_size: int, rank: int,
                    world: int, device: torch.device, answer_format: str = "auto",
                    predictions_split: str | None = None) -> GenResult:
    """Decode every record once per lambda (0.0 = Pilot alone) and score the answers.

    `answer_format` 'auto' is resolved on this split's golds (the same on every rank). With
    `predictions_split`, `rows` holds one prediction row per (record of this rank, lambda).
    """
    scorer = AnswerScorer.for_golds(answer_format, [r["answer"] for r in records])
    n_lambdas = len(lambdas)
    # Per lambda, this rank's counts; summed across ranks at the end.
    correct, flips, flipped, flipped_ok, truncated, fixes, breaks = \
        ([0.0] * n_lambdas for _ in range(7))
    rows: list[dict[str, Any]] = []
    n_total = 0.0
    max_abs_f, margins = [], []
    indexed = list(enumerate(records))
    decode = tokenizer.decode
    for items, n_real in shard_batches(indexed, rank=rank, world=world, batch_size=batch_size):
        prompts = [encode_prompt(tokenizer, r["prompt"]) for _, r in items]
        tokens, stats = fused_generate(pilot, tap, copilot, prompts, lambdas=lambdas, opts=opts,
                                       eos_id=tokenizer.eos_token_id,
                                       pad_id=tokenizer.pad_token_id, device=device,
                                       decode=decode)
        flips_per_row = stats.flips.view(n_lambdas, len(items)).cpu()
        assert stats.hit_budget is not None
        hit = stats.hit_budget.view(n_lambdas, len(items)).cpu()
        pilot_ok: list[bool] = []
        for lam_idx in range(n_lambdas):
            for item in range(n_real):
                raw = str(decode(tokens[lam_idx][item]))
                text = cut_at_stop(raw, opts.stop)
                is_correct = scorer.correct(text, items[item][1]["answer"])
                correct[lam_idx] += is_correct
                if lam_idx == 0:
                    pilot_ok.append(is_correct)
                fixes[lam_idx] += is_correct and not pilot_ok[item]
                breaks[lam_idx] += pilot_ok[item] and not is_correct
                truncated[lam_idx] += bool(hit[lam_idx, item])
                if predictions_split is not None:
                    rows.append(prediction_row(
                        split=predictions_split, index=items[item][0], record=items[item][1],
                        lam=float(lambdas[lam_idx]), generation=raw, answer_text=text,
                        scorer=scorer, correct=is_correct, hit_budget=bool(hit[lam_idx, item])))
                flips[lam_idx] += int(flips_per_row[lam_idx, item])
                if flips_per_row[lam_idx, item] > 0:
                    flipped[lam_idx] += 1
                    flipped_ok[lam_idx] += is_correct
        n_total += n_real
        if n_real:
            max_abs_f += stats.max_abs_f
            margins += stats.margin
    per_lambda = [correct, flips, flipped, flipped_ok, truncated, fixes, breaks]
    total = sum_across_ranks([n_total, *(x for counts in per_lambda for x in counts)], device)
    n_scored = total[0]
    correct, flips, flipped, flipped_ok, truncated, fixes, breaks = (
        total[1 + k * n_lambdas:1 + (k + 1) * n_lambdas] for k in range(len(per_lambda)))
    return GenResult(lambdas=list(lambdas), accuracy=[c / max(n_scored, 1) for c in correct],
                     flips=_ints(flips), flipped_rows=_ints(flipped),
                     flipped_rows_correct=_ints(flipped_ok), fixes=_ints(fixes),
                     breaks=_ints(breaks), max_abs_f_median=_median(max_abs_f),
                     pilot_margin_median=_median(margins), n=int(n_scored),
                     answer_format=scorer.format, truncated=_ints(truncated), rows=rows)


def _ints(counts: list[float]) -> list[int]:
    return [int(x) for x in counts]


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")
