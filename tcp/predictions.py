"""predictions.jsonl: why each test answer scored as it did.

One line per (test example, lambda decoded): the Pilot alone (lambda 0) and Pilot+Copilot at the
chosen lambda (one line per example when the chosen lambda is 0). Fields: split, index (in the
split), prompt, gold, lambda, generation (the raw decoded text, EOS excluded), answer_text (cut
at the first stop string: what was scored), parsed (the canonical answer, or null), parse_error
(why none parsed, e.g. "no number found", or null), correct, hit_budget (the generation ended on
`eval.max_new_tokens` without EOS or a stop string). The main job writes
`<output_dir>/predictions.jsonl`, `tcp-eval` `<run>/eval/<name>.predictions.jsonl`.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tcp.tasks import AnswerScorer


def prediction_row(*, split: str, index: int, record: dict[str, str], lam: float,
                   generation: str, answer_text: str, scorer: AnswerScorer, correct: bool,
                   hit_budget: bool) -> dict[str, Any]:
    """One line of predictions.jsonl (see the module docstring)."""
    parsed, reason = scorer.parse_with_reason(answer_text)
    if reason is None and scorer.parse(record["answer"]) is None:
        reason = f"the gold answer holds no {scorer.format} answer"
    return {"split": split, "index": index, "prompt": record["prompt"],
            "gold": record["answer"], "lambda": lam, "generation": generation,
            "answer_text": answer_text, "parsed": jsonable(parsed), "parse_error": reason,
            "correct": bool(correct), "hit_budget": bool(hit_budget)}


def jsonable(parsed: object) -> Any:
    """A parsed answer as JSON: numbers stay numbers (exact fractions as "3/4")."""
    if isinstance(parsed, Fraction):
        return int(parsed) if parsed.denominator == 1 else str(parsed)
    return parsed


def gather_rows(rows: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    """Every rank's rows, ordered by (index, lambda). Collective when a group is up."""
    parts: list[Any] = [rows]
    if dist.is_initialized() and world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, rows)
    out = [r for part in parts for r in part]
    return sorted(out, key=lambda r: (r["index"], r["lambda"]))


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomic JSONL write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
