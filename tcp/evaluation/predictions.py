"""predictions.jsonl: the evidence behind the test numbers, one line per test example.

Each line holds the example, what the Pilot alone answered and what Pilot+Copilot answered at
the lambda chosen on validation, so one line is one diff. With the Copilot off (lambda 0 chosen)
both outputs are the same decode. Lines are sorted by `index`; every rank's shard is gathered, so
the file has exactly `test_size` lines and its correct flags give results.json's accuracies and
its "paired" test (tcp.evaluation.stats). Example (pretty-printed; one line in the file):

    {"split": "test", "index": 0, "prompt": "Q: Dev had 19 rocks and gave away 6. ...\nA: ",
     "gold": "13", "lambda": 0.5, "outcome": "fixed", "changed": true,
     "pilot": {"lambda": 0.0, "generation": "10", "answer_text": "10", "parsed": 10,
               "parse_error": null, "correct": false, "hit_budget": false},
     "pilot+copilot": {"lambda": 0.5, "generation": "13", "answer_text": "13", "parsed": 13,
                       "parse_error": null, "correct": true, "hit_budget": false}}

Top level: split, index (in the split), prompt, gold, lambda (the chosen one: Pilot+Copilot's),
outcome ("both_correct", "both_wrong", "fixed": only Pilot+Copilot correct, the paired test's c;
"broken": only the Pilot correct, its b), changed (the scored answer texts differ). "pilot" and
"pilot+copilot" each hold one decode: lambda, generation (the raw decoded text, EOS excluded),
answer_text (cut at the first stop string: what was scored), parsed (the canonical answer, or
null), parse_error (why none parsed, e.g. "no number found", or null), correct, hit_budget (the
generation ended on `eval.max_new_tokens` without EOS or a stop string). The main job writes
`<output_dir>/predictions.jsonl` beside results.json, `tcp-eval`
`<run>/eval/<name>.predictions.jsonl` beside `<name>.json`.

Files written before this format had one line per (example, lambda) with the per-decode fields
at the top level; `read_paired_flags` reads both.
"""
from __future__ import annotations

import collections
import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tcp.evaluation.answer_scoring import AnswerScorer
from tcp.evaluation.stats import paired_comparison
from tcp.runtime.atomic import atomic_write

EXAMPLE_KEYS = ("split", "index", "prompt", "gold")
"""The fields of a decode row that describe the example, not the decode."""


def prediction_row(*, split: str, index: int, record: dict[str, str], lam: float,
                   generation: str, answer_text: str, scorer: AnswerScorer, correct: bool,
                   hit_budget: bool) -> dict[str, Any]:
    """One decode of one example (this rank's, per lambda decoded): the example's fields and
    the decode's; `pair_rows` joins the Pilot's and Pilot+Copilot's into a file line."""
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
    """predictions.jsonl, one row per line, written durably (tcp.runtime.atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def pair_rows(rows: list[dict[str, Any]], lam: float) -> list[dict[str, Any]]:
    """One line per example from the decode rows of `prediction_row` (all ranks' rows): the
    Pilot's (lambda 0) beside Pilot+Copilot's at `lam` (the same decode when `lam` is 0)."""
    by_index: dict[int, dict[float, dict[str, Any]]] = {}
    for r in rows:
        by_index.setdefault(r["index"], {})[r["lambda"]] = r
    lines = []
    for index in sorted(by_index):
        decodes = by_index[index]
        pilot, fused = decodes[0.0], decodes[lam]
        lines.append({k: pilot[k] for k in EXAMPLE_KEYS} | {
            "lambda": lam, "outcome": outcome(pilot["correct"], fused["correct"]),
            "changed": pilot["answer_text"] != fused["answer_text"],
            "pilot": _decode(pilot), "pilot+copilot": _decode(fused)})
    return lines


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in EXAMPLE_KEYS}


def outcome(pilot_correct: bool, copilot_correct: bool) -> str:
    """The example's cell of the paired 2x2 table (see the module docstring)."""
    if pilot_correct == copilot_correct:
        return "both_correct" if pilot_correct else "both_wrong"
    return "fixed" if copilot_correct else "broken"


def paired_summary(lines: list[dict[str, Any]], lam: float) -> dict[str, Any]:
    """results.json["paired"]: McNemar and the bootstrap interval (tcp.evaluation.stats) over the
    per-example lines of `pair_rows`, with the lambda compared and whether the Copilot was off
    (then b = c = 0, p = 1 and the difference is 0 by construction)."""
    p = paired_comparison([ln["pilot"]["correct"] for ln in lines],
                          [ln["pilot+copilot"]["correct"] for ln in lines])
    return p.to_dict() | {"lambda": lam, "copilot_off": lam == 0}


def read_paired_flags(path: Path, lam: float | None = None) -> tuple[list[bool], list[bool]]:
    """(Pilot, Pilot+Copilot) correct flags per example, ordered by index, from a
    predictions.jsonl in either format; `lam` (the run's chosen lambda) is needed only for the
    older one-line-per-(example, lambda) files."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if rows and "pilot" not in rows[0]:
        if lam is None:
            raise ValueError(f"{path} has one line per (example, lambda): pass the chosen "
                             "lambda to pair them")
        rows = pair_rows(rows, lam)
    rows.sort(key=lambda r: r["index"])
    return ([bool(r["pilot"]["correct"]) for r in rows],
            [bool(r["pilot+copilot"]["correct"]) for r in rows])


def read_test_rows(path: Path) -> list[dict[str, Any]]:
    """The test lines of a run folder's predictions.jsonl, or of a predictions file itself
    (e.g. `tcp-eval`'s `<run>/eval/<name>.predictions.jsonl`); this format only."""
    file = path / "predictions.jsonl" if path.is_dir() else path
    rows = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "test"]


def breakdown_table(rows: list[dict[str, Any]],
                    breakdown: Callable[[dict[str, Any], str], tuple[str, ...]],
                    columns: list[str]) -> str:
    """Markdown table counting the test lines by `breakdown(row, who)` (a tuple of labels, one
    per `columns` entry), for the Pilot and for Pilot+Copilot side by side."""
    whos = ("pilot", "pilot+copilot")
    counts = {w: collections.Counter(breakdown(r, w) for r in rows) for w in whos}
    lines = [f"| {' | '.join(columns)} | Pilot | Pilot+Copilot |",
             "|" + "---|" * (len(columns) + 2)]
    for key in sorted(set(counts["pilot"]) | set(counts["pilot+copilot"])):
        lines.append(f"| {' | '.join(key)} | {counts['pilot'][key]} | "
                     f"{counts['pilot+copilot'][key]} |")
    return "\n".join(lines)
