"""Built-in task families beyond the default arithmetic word problems (issue 18).

Each is a generator like `tcp.data.arithmetic` (nothing downloaded; a pure function of seed,
split and size) and is loaded through the same path as a user's JSONL records
(`tcp.data.loaders`: `data.source: multistep | choice | yesno`, or export them with
`tools/export_task.py` and train on the files with `data.source: jsonl`):

- **multistep**: word problems of two or three operations whose answer writes out every
  intermediate quantity, GSM8K style: "3*12=36. 20+36=56. 56-9=47. #### 47" (numeric format:
  the number after "####" is scored).
- **choice**: an arithmetic word problem with four numeric options in the prompt, one per line
  ("answer2: 59"), answered by stating the value, checking the options in order until the one
  equal to it, then the paper's format: "59. answer1: 58 no, answer2: 59 yes, so the correct
  answer is answer2" (`arithmetic.choice_walk`; the choice format scores the last "answerN").
  Earlier layouts left the 4-layer Pilot at chance: the bare "the correct answer is answer2"
  collapsed onto one option (25.0% on seed 0); "59 is answer2, so the correct answer is
  answer2" with options listed "59 is answer2" had it state the right value 37% of the time
  but write the label that follows that value at chance, even after a base model trained on
  that layout: finding an option's label from a multi-digit value is a lookup it never
  learned. Checking the options in order needs only steps it can learn: copying what follows
  "answerK:" in the prompt, comparing two values it has written (as yes/no does) and repeating
  the last label checked. The gold position cycles with the problem's index, so every
  position holds the gold for a quarter of a split (to within one). The options are an
  evenly spaced run (spacing 1, 2 or 10) with the gold at a random place in it
  (`arithmetic.near_misses`), so the values alone do not tell which one is right.
- **yesno**: an arithmetic word problem followed by a claimed answer, "Is the answer 59?", gold
  "59, so yes" or "41, so no" alternating with the index (half each; the yes/no format scores
  the yes/no word). A false claim is the answer of another problem of the same operation
  (`arithmetic.other_answer`): as large as a right answer, so the claim alone tells nothing,
  and seldom close to it, so a Pilot that copies the claim as its value is far off on most
  false claims (the default Pilot still copies claims that look plausible:
  docs/archive/results-history.md).
  With false claims off by 1, 2 or 10 (near misses, the first design) the default Pilot copied
  the claim as its value on 96% of test problems (767 of 800, seed 0) and said "yes" to 83%:
  copying got most digits right, computing fewer. As with choice, a bare "yes"/"no" left the
  Pilot answering one word to everything (50.0% on seed 0).

Splits are disjoint by *question*: choice and yesno key each problem by its arithmetic question
(`Problem.key`), so the same question never appears in two splits with other options or another
claim (`arithmetic.distinct_split`).
"""

from __future__ import annotations

import random

from tcp.data import arithmetic
from tcp.data.arithmetic import ITEMS, NAMES, SPLIT_OFFSET, TASK, Problem

FAMILIES = ("multistep", "choice", "yesno")
"""The built-in families; with "arithmetic", the values of `data.source` generated here."""
CHOICES = 4
"""Options per multiple-choice problem."""


def _rng(family: str, seed: int, split: str, index: int, draw: int) -> random.Random:
    """The random stream of one draw; the family name keeps families' streams apart."""
    if split not in SPLIT_OFFSET or split == "base":
        raise ValueError(f"split must be train, validation or test, got {split!r}")
    key = f"{family}/{seed}/{SPLIT_OFFSET[split] + index}"
    return random.Random(f"{key}/{draw}" if draw else key)


# ------------------------------------------------------------------ multistep
def _multistep(rng: random.Random) -> tuple[str, str, str]:
    """(question, worked answer, form) of one multi-step problem."""
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    form = rng.choice(("buy_give", "pool_split", "box_use_get"))
    if form == "buy_give":
        a, b, c = rng.randint(2, 50), rng.randint(2, 5), rng.randint(2, 12)
        s = a + b * c
        d = rng.randint(1, s - 1)
        q = (f"{n} has {a} {it}s, buys {b} bags of {c} {it}s, then gives away {d}. "
             f"How many {it}s now?")
        steps = [f"{b}*{c}={b * c}", f"{a}+{b * c}={s}", f"{s}-{d}={s - d}"]
    elif form == "pool_split":
        c, per = rng.randint(2, 6), rng.randint(2, 12)
        total = c * per
        a = rng.randint(1, total - 1)
        q = (f"{n} has {a} {it}s and gets {total - a} more, then splits them into {c} equal "
             f"piles. How many per pile?")
        steps = [f"{a}+{total - a}={total}", f"{total}/{c}={per}"]
    else:
        b, c = rng.randint(2, 6), rng.randint(2, 12)
        d = rng.randint(1, b * c - 1)
        e = rng.randint(2, 40)
        q = (f"{n} buys {b} boxes of {c} {it}s, uses {d}, then gets {e} more. "
             f"How many {it}s now?")
        steps = [f"{b}*{c}={b * c}", f"{b * c}-{d}={b * c - d}", f"{b * c - d}+{e}={b * c - d + e}"]
    final = steps[-1].rsplit("=", 1)[1]
    return q, ". ".join(steps) + f". #### {final}", form


def make_multistep(seed: int, split: str, index: int, draw: int = 0) -> Problem:
    """Draw `draw` of multistep problem `index` of `split`."""
    q, answer, op = _multistep(_rng("multistep", seed, split, index, draw))
    return Problem(prompt=f"Q: {q}\nA: ", answer=answer, op=op)


# ------------------------------------------------------------------ choice / yesno
def _question(family: str, seed: int, split: str, index: int,
              draw: int) -> tuple[random.Random, str, int, str]:
    """(the draw's random stream, question, result, op) of one single-operation arithmetic word
    problem (the default task's templates). As in the default task, the operation is drawn
    from the index alone, so a redraw keeps it and a split keeps the operation mix."""
    rng = _rng(family, seed, split, index, 0)
    op = rng.choice(arithmetic.OPS)
    if draw:
        rng = _rng(family, seed, split, index, draw)
    xs = arithmetic.operands(rng, op)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return rng, TASK[op](name, item, xs), arithmetic.result(op, xs), op


def make_choice(seed: int, split: str, index: int, draw: int = 0) -> Problem:
    """Draw `draw` of multiple-choice problem `index` of `split`; the gold is option
    `index % CHOICES + 1` whatever the draw (balanced positions)."""
    rng, q, gold, op = _question("choice", seed, split, index, draw)
    options = arithmetic.near_misses(rng, gold, CHOICES - 1)
    pos = index % CHOICES
    options.insert(pos, gold)
    listed, answer = arithmetic.choice_walk(options, pos)
    return Problem(prompt=f"Q: {q}\n{listed}\nA: ", answer=answer, op=op, key=q)


def make_yesno(seed: int, split: str, index: int, draw: int = 0) -> Problem:
    """Draw `draw` of yes/no problem `index` of `split`; even indices claim the right answer
    ("yes"), odd ones another problem's answer ("no", `arithmetic.other_answer`)."""
    rng, q, gold, op = _question("yesno", seed, split, index, draw)
    yes = index % 2 == 0
    claim = gold if yes else arithmetic.other_answer(rng, op, gold)
    return Problem(prompt=f"Q: {q} Is the answer {claim}?\nA: ",
                   answer=f"{gold}, so {'yes' if yes else 'no'}", op=op, key=q)


MAKERS: dict[str, arithmetic.Maker] = {
    "multistep": make_multistep, "choice": make_choice, "yesno": make_yesno,
}


def generate(family: str, seed: int, split: str, size: int) -> list[dict[str, str]]:
    """`size` problems of `family`'s `split` as records {'prompt', 'answer', 'op'}; splits are
    disjoint by question (module docstring)."""
    if family == "arithmetic":
        return arithmetic.generate(seed, split, size)
    if family not in MAKERS:
        raise ValueError(f"unknown task family {family!r}; one of arithmetic, "
                         f"{', '.join(FAMILIES)}")
    problems = arithmetic.distinct_split(MAKERS[family], seed, split, size, task=family)
    return [arithmetic.record(p) for p in problems]
