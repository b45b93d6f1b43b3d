#!/usr/bin/env python
"""How a yes/no run's Pilot (and Pilot+Copilot) decides, from its predictions.jsonl (issue 18).

The yesno family (tcp/data/families.py) asks "<word problem> Is the answer C?" and expects
"V, so yes|no", where V is the computed answer. A Pilot can skip computing V by copying the
claim C as its value and then saying "yes"; this tool counts how often it does, per kind of
item (claim true / false), and how often the value it wrote is right:

    python tools/analyze_yesno.py runs/families3/yesno-seed0 [more run dirs...]

Prints one markdown table per run: test items by gold word, whether the written value copies
the claim, whether it is right, and the word said; then the test items whose Pilot+Copilot
answer differs from the Pilot's, counted by how it changed (towards or away from copying the
claim) and whether that fixed or broke the item.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from tcp.evaluation.predictions import breakdown_table, read_test_rows

CLAIM = re.compile(r"Is the answer (-?\d+)\?")
ANSWER = re.compile(r"\s*(-?\d+), so (yes|no)\b")


def breakdown(row: dict, who: str) -> tuple[str, ...]:
    """(gold word, copies the claim?, value right?, word said) of one test item."""
    claim = CLAIM.search(row["prompt"]).group(1)
    gold_value, gold_word = row["gold"].split(", so ")
    m = ANSWER.match(row[who]["generation"])
    if not m:
        return gold_word, "unparsable", "-", "-"
    value, word = m.groups()
    return (gold_word, "copies the claim" if value == claim else "own value",
            "value right" if value == gold_value else "value wrong", f"says {word}")


def report(run: Path) -> None:
    rows = read_test_rows(run)
    print(f"\n{run} (test n = {len(rows)})\n")
    print(breakdown_table(rows, breakdown, ["gold", "value", "right?", "word"]))
    changed = collections.Counter()
    for r in rows:
        before, after = breakdown(r, "pilot"), breakdown(r, "pilot+copilot")
        if r["pilot"]["generation"] != r["pilot+copilot"]["generation"]:
            move = ("towards copying the claim" if after[1] == "copies the claim" != before[1]
                    else "away from the claim" if before[1] == "copies the claim" != after[1]
                    else "another value or word")
            changed[(move, "fixed" if r["pilot+copilot"]["correct"] > r["pilot"]["correct"]
                     else "broke" if r["pilot+copilot"]["correct"] < r["pilot"]["correct"]
                     else "no effect")] += 1
    print(f"\nanswers Pilot+Copilot changed: {sum(changed.values())}")
    for (move, effect), n in sorted(changed.items()):
        print(f"- {move}: {n} ({effect})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="yesno run directories")
    for run in ap.parse_args().runs:
        report(run)


if __name__ == "__main__":
    main()
