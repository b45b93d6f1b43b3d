"""The embedded default task: deterministic arithmetic word problems with numeric answers.

Two distributions share one generator:
- the **task** (what the Pilot is fine-tuned and evaluated on): word problems in the `TASK`
  templates, with train/validation/test splits drawn from disjoint seeds;
- the **base corpus** (what the base model of the default regime is pre-trained on): plain
  equations for every operation plus word problems in *other* phrasings (`BASE` templates), so
  the base model knows arithmetic and English-ish text but not the task's exact wording.

Everything is a pure function of (seed, split, index): the same seed gives the same problems on
every rank and every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ["Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea"]
ITEMS = ["apple", "coin", "book", "card", "pen", "shell", "stamp", "egg", "rock", "cup"]
SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003, "base": 3_000_017}


@dataclass(frozen=True)
class Problem:
    """One generated problem."""

    prompt: str
    answer: str
    op: str


def _operands(rng: random.Random, op: str) -> tuple[int, ...]:
    if op == "add":
        return rng.randint(2, 99), rng.randint(2, 99)
    if op == "sub":
        a = rng.randint(10, 99)
        return a, rng.randint(1, a)
    if op == "mul":
        return rng.randint(2, 9), rng.randint(2, 29)
    if op == "div":
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        return b * q, b
    if op == "two_step":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return a, b, rng.randint(1, a + b)
    raise ValueError(f"unknown op {op!r}")


def _result(op: str, xs: tuple[int, ...]) -> int:
    return {
        "add": lambda: xs[0] + xs[1],
        "sub": lambda: xs[0] - xs[1],
        "mul": lambda: xs[0] * xs[1],
        "div": lambda: xs[0] // xs[1],
        "two_step": lambda: xs[0] + xs[1] - xs[2],
    }[op]()


Template = Callable[[str, str, tuple[int, ...]], str]

TASK: dict[str, Template] = {
    "add": lambda n, it, x: f"{n} has {x[0]} {it}s and gets {x[1]} more. How many {it}s now?",
    "sub": lambda n, it, x: f"{n} had {x[0]} {it}s and gave away {x[1]}. How many are left?",
    "mul": lambda n, it, x: f"{n} buys {x[0]} bags of {x[1]} {it}s. How many {it}s in all?",
    "div": lambda n, it, x: f"{n} splits {x[0]} {it}s into {x[1]} equal piles. How many per pile?",
    "two_step": lambda n, it, x: f"{n} has {x[0]} {it}s, finds {x[1]}, then loses {x[2]}. "
    "How many now?",
}

BASE: dict[str, Template] = {
    "add": lambda n, it, x: f"There are {x[0]} {it}s. {n} adds {x[1]}. Total?",
    "sub": lambda n, it, x: f"From {x[0]} {it}s, {n} takes {x[1]}. What remains?",
    "mul": lambda n, it, x: f"{x[0]} rows of {x[1]} {it}s make how many?",
    "div": lambda n, it, x: f"{x[0]} {it}s shared by {x[1]} friends. Each gets?",
    "two_step": lambda n, it, x: f"{n}: {x[0]} {it}s, plus {x[1]}, minus {x[2]}. Result?",
}
SYMBOL = {"add": "{0}+{1}", "sub": "{0}-{1}", "mul": "{0}*{1}", "div": "{0}/{1}",
          "two_step": "{0}+{1}-{2}"}
OPS = list(TASK)


def make_problem(seed: int, split: str, index: int) -> Problem:
    """Problem `index` of `split` ('train' | 'validation' | 'test' | 'base') for `seed`."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSET)}, got {split!r}")
    rng = random.Random(f"{seed}/{SPLIT_OFFSET[split] + index}")
    op = rng.choice(OPS)
    xs = _operands(rng, op)
    answer = str(_result(op, xs))
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if split == "base":
        # Half plain equations, half word problems in the base phrasings.
        text = SYMBOL[op].format(*xs) + "=" if rng.random() < 0.5 else BASE[op](name, item, xs)
        return Problem(prompt=f"Q: {text}\nA: ", answer=answer, op=op)
    return Problem(prompt=f"Q: {TASK[op](name, item, xs)}\nA: ", answer=answer, op=op)


def generate(seed: int, split: str, size: int) -> list[dict[str, str]]:
    """`size` problems of `split` as records {'prompt', 'answer', 'op'}."""
    out = []
    for i in range(size):
        p = make_problem(seed, split, i)
        out.append({"prompt": p.prompt, "answer": p.answer, "op": p.op})
    return out
