#!/usr/bin/env python
"""Where a choice run's Pilot (and Pilot+Copilot) goes wrong, from its predictions (issue 18).

The choice family (tcp/data/families.py) lists four options "V is answerN" and expects
"V is answerN, so the correct answer is answerN" with V the computed answer. Getting it right
takes two steps: computing V (or picking it among the options), then looking up the label that
follows V in the prompt. This tool splits the test items by the two:

    python tools/analyze_choice.py runs/choicevf/choice-seed0 [more run dirs or *.predictions.jsonl]
    python tools/analyze_choice.py --base runs/base-cache/<hash> [--n 200]


Per run, one markdown table: whether the value written is the right one, another option or no
option at all; whether the label written is the one that follows that value in the prompt;
counts for the Pilot and for Pilot+Copilot. Then the items whose answer Pilot+Copilot changed,
by what changed (the value, or only the label) and whether that fixed or broke the item.

With `--base`, the same table for a cached base model (greedy, no Copilot) on held-out base
corpus items in the family's layout (`base.formats: choice_value_first`, another corpus seed
than any base model's): does the base model itself look labels up?
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from tcp.predictions import breakdown_table, read_test_rows

OPTION = re.compile(r"^(-?\d+) is answer(\d)$", re.M)
ANSWER = re.compile(r"\s*(-?\d+) is answer(\d)\b")


def breakdown(row: dict, who: str) -> tuple[str, str]:
    """(what the value is, whether the label follows it in the prompt) of one test item."""
    options = {v: n for v, n in OPTION.findall(row["prompt"])}
    gold_value = ANSWER.match(row["gold"]).group(1)
    m = ANSWER.match(row[who]["generation"])
    if not m:
        return "unparsable", "-"
    value, label = m.groups()
    what = ("right value" if value == gold_value else
            "another option" if value in options else "not an option")
    if value not in options:
        return what, "-"
    return what, "label follows it" if options[value] == label else "label of another option"


def report(path: Path) -> None:
    rows = read_test_rows(path)
    print(f"\n{path} (test n = {len(rows)})\n")
    print(breakdown_table(rows, breakdown, ["value", "label"]))
    for who in ("pilot", "pilot+copilot"):
        right = sum(bool(r[who]["correct"]) for r in rows)
        print(f"\n{who}: exact match {right} of {len(rows)} ({right / max(1, len(rows)):.4f})")
    changed = collections.Counter()
    for r in rows:
        if r["pilot"]["generation"] == r["pilot+copilot"]["generation"]:
            continue
        before, after = breakdown(r, "pilot"), breakdown(r, "pilot+copilot")
        what = "the value" if before[0] != after[0] else "the label or the value within its kind"
        effect = ("fixed" if r["pilot+copilot"]["correct"] > r["pilot"]["correct"] else
                  "broke" if r["pilot+copilot"]["correct"] < r["pilot"]["correct"] else
                  "no effect")
        changed[(what, effect)] += 1
    print(f"\nanswers Pilot+Copilot changed: {sum(changed.values())}")
    for (what, effect), n in sorted(changed.items()):
        print(f"- changed {what}: {n} ({effect})")


def probe_base(model_dir: Path, n: int) -> None:
    """Greedy answers of a base model to `n` held-out 'choice_value_first' base items."""
    import torch
    from transformers import LlamaForCausalLM

    from tcp.data import arithmetic
    from tcp.data.collate import encode_prompt
    from tcp.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    recs = arithmetic.generate(99, "base", n, base_formats=("choice_value_first",))
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in recs:
        ids = torch.tensor([encode_prompt(tok, r["prompt"])])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=64, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        gen = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        counts[breakdown({"prompt": r["prompt"], "gold": r["answer"],
                          "pilot": {"generation": gen}}, "pilot")] += 1
    print(f"\n{model_dir}: base model on {n} held-out base items in the choice layout\n")
    print("| value | label | base model |")
    print("|---|---|---|")
    for key, c in sorted(counts.items()):
        print(f"| {' | '.join(key)} | {c} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path,
                    help="choice run directories (or their eval/*.predictions.jsonl files)")
    ap.add_argument("--base", type=Path, help="a cached base model folder to probe instead")
    ap.add_argument("--n", type=int, default=200, help="base items to probe (--base)")
    args = ap.parse_args()
    if args.base is not None:
        probe_base(args.base, args.n)
    for run in args.runs:
        report(run)


if __name__ == "__main__":
    main()
