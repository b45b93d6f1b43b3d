#!/usr/bin/env python
"""Where a choice run's Pilot (and Pilot+Copilot) goes wrong, from its predictions (issue 18).

The choice family (tcp/data/families.py, `arithmetic.choice_walk`) lists four options
"answerN: V" and expects the computed value, a check of the options in order, then the paper's
sentence: "59. answer1: 58 no, answer2: 59 yes, so the correct answer is answer2". Getting it
right takes three steps: computing the value, checking the options (copying each option's
value from its line and comparing it with the value written first), and naming the option
that matched. This tool splits the test items by the three:

    python tools/analyze_choice.py runs/walk/choice-seed0 [more run dirs or *.predictions.jsonl]
    python tools/analyze_choice.py --base ~/.cache/tcp/base/<key> [--n 200]


Per run, one markdown table: whether the value written first is the right one, another option
or no option at all; whether the check was right (each value copied from its line, "no" to
every option before the first one equal to the value written, "yes" to that one); whether the
label named last is that option's; counts for the Pilot and for Pilot+Copilot. Then the items
whose answer Pilot+Copilot changed, by what changed (the value, or only the check or label)
and whether that fixed or broke the item.

With `--base`, the same table for a cached base model (greedy, no Copilot) on held-out base
corpus items in the family's layout (`base.formats: choice_walk`, another corpus seed than any
base model's): does the base model itself check and name options?
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from tcp.evaluation.answer_scoring import parse_choice
from tcp.evaluation.predictions import breakdown_table, read_test_rows

OPTION = re.compile(r"^answer(\d): (-?\d+)$", re.M)
VALUE = re.compile(r"\s*(-?\d+)\.")
CHECK = re.compile(r"answer(\d): (-?\d+) (yes|no)\b")


def breakdown(row: dict, who: str) -> tuple[str, str, str]:
    """(what the value is, whether the check is right, whether the label named is the option
    of that value) of one test item."""
    options = {v: n for n, v in OPTION.findall(row["prompt"])}
    gold_value = VALUE.match(row["gold"]).group(1)
    text = row[who]["generation"]
    m = VALUE.match(text)
    if not m:
        return "unparsable", "-", "-"
    value = m.group(1)
    what = ("right value" if value == gold_value else
            "another option" if value in options else "not an option")
    if value not in options:
        return what, "-", "-"
    pos = int(options[value])
    by_label = {n: v for v, n in options.items()}
    want = [(str(i), by_label[str(i)], "yes" if i == pos else "no") for i in range(1, pos + 1)]
    check = "check right" if CHECK.findall(text) == want else "check wrong"
    named = parse_choice(text)
    return what, check, "names its option" if named == pos else "names another option"


def report(path: Path) -> None:
    rows = read_test_rows(path)
    print(f"\n{path} (test n = {len(rows)})\n")
    print(breakdown_table(rows, breakdown, ["value", "check", "label"]))
    for who in ("pilot", "pilot+copilot"):
        right = sum(bool(r[who]["correct"]) for r in rows)
        print(f"\n{who}: exact match {right} of {len(rows)} ({right / max(1, len(rows)):.4f})")
    changed = collections.Counter()
    for r in rows:
        if r["pilot"]["generation"] == r["pilot+copilot"]["generation"]:
            continue
        before, after = breakdown(r, "pilot"), breakdown(r, "pilot+copilot")
        what = ("the value" if before[0] != after[0] else
                "the check or label, or the value within its kind")
        effect = ("fixed" if r["pilot+copilot"]["correct"] > r["pilot"]["correct"] else
                  "broke" if r["pilot+copilot"]["correct"] < r["pilot"]["correct"] else
                  "no effect")
        changed[(what, effect)] += 1
    print(f"\nanswers Pilot+Copilot changed: {sum(changed.values())}")
    for (what, effect), n in sorted(changed.items()):
        print(f"- changed {what}: {n} ({effect})")


def probe_base(model_dir: Path, n: int) -> None:
    """Greedy answers of a base model to `n` held-out 'choice_walk' base items."""
    import torch
    from transformers import LlamaForCausalLM

    from tcp.data import arithmetic
    from tcp.data.collate import encode_prompt
    from tcp.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    recs = arithmetic.generate(99, "base", n, base_formats=("choice_walk",))
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in recs:
        ids = torch.tensor([encode_prompt(tok, r["prompt"])])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=128, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        gen = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        counts[breakdown({"prompt": r["prompt"], "gold": r["answer"],
                          "pilot": {"generation": gen}}, "pilot")] += 1
    print(f"\n{model_dir}: base model on {n} held-out base items in the choice layout\n")
    print("| value | check | label | base model |")
    print("|---|---|---|---|")
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
