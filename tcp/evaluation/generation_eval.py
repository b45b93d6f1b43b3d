"""Decode a split with the Pilot alone and at each λ, and score it: accuracy, flips, fixes and
breaks against the Pilot, truncation, per-example rows (METHOD.md §6 diagnostics).

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
from tcp.evaluation.shards import shard_batches, sum_across_ranks
from tcp.models.pilot import PilotTap


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
    L = len(lambdas)
    correct = [0.0] * L
    flips, frows, frows_ok, cut = [0.0] * L, [0.0] * L, [0.0] * L, [0.0] * L
    fixes, breaks = [0.0] * L, [0.0] * L
    rows: list[dict[str, Any]] = []
    n_total = 0.0
    fmax, margins = [], []
    indexed = list(enumerate(records))
    decode = tokenizer.decode
    for items, n_real in shard_batches(indexed, rank=rank, world=world, batch_size=batch_size):
        prompts = [encode_prompt(tokenizer, r["prompt"]) for _, r in items]
        toks, st = fused_generate(pilot, tap, copilot, prompts, lambdas=lambdas, opts=opts,
                                  eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                  device=device, decode=decode)
        B = len(items)
        flips_rows = st.flips.view(L, B).cpu()
        assert st.hit_budget is not None
        hit = st.hit_budget.view(L, B).cpu()
        pilot_ok: list[bool] = []
        for li in range(L):
            for b in range(n_real):
                raw = str(decode(toks[li][b]))
                text = cut_at_stop(raw, opts.stop)
                ok = scorer.correct(text, items[b][1]["answer"])
                correct[li] += ok
                if li == 0:
                    pilot_ok.append(ok)
                fixes[li] += ok and not pilot_ok[b]
                breaks[li] += pilot_ok[b] and not ok
                cut[li] += bool(hit[li, b])
                if predictions_split is not None:
                    rows.append(prediction_row(
                        split=predictions_split, index=items[b][0], record=items[b][1],
                        lam=float(lambdas[li]), generation=raw, answer_text=text, scorer=scorer,
                        correct=ok, hit_budget=bool(hit[li, b])))
                flips[li] += int(flips_rows[li, b])
                if flips_rows[li, b] > 0:
                    frows[li] += 1
                    frows_ok[li] += ok
        n_total += n_real
        if n_real:
            fmax += st.max_abs_f
            margins += st.margin
    tot = sum_across_ranks([n_total, *correct, *flips, *frows, *frows_ok, *cut, *fixes, *breaks],
                           device)
    n = tot[0]
    acc = [c / max(n, 1) for c in tot[1:1 + L]]
    fl = [int(x) for x in tot[1 + L:1 + 2 * L]]
    fr = [int(x) for x in tot[1 + 2 * L:1 + 3 * L]]
    fro = [int(x) for x in tot[1 + 3 * L:1 + 4 * L]]
    tr = [int(x) for x in tot[1 + 4 * L:1 + 5 * L]]
    fx = [int(x) for x in tot[1 + 5 * L:1 + 6 * L]]
    br = [int(x) for x in tot[1 + 6 * L:1 + 7 * L]]
    return GenResult(lambdas=list(lambdas), accuracy=acc, flips=fl, flipped_rows=fr,
                     flipped_rows_correct=fro, fixes=fx, breaks=br,
                     max_abs_f_median=_median(fmax), pilot_margin_median=_median(margins),
                     n=int(n), answer_format=scorer.format, truncated=tr, rows=rows)


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")
