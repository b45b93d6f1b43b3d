"""The embedded default task: deterministic arithmetic word problems with numeric answers.

Two distributions share one generator:
- the **task** (what the Pilot is fine-tuned and evaluated on): word problems in the `TASK`
  templates, with train/validation/test splits that share no prompt (`generate`);
- the **base corpus** (what the base model of the default regime is pre-trained on): plain
  equations for every operation plus word problems in *other* phrasings (`BASE` templates), and
  with `base.formats` the equations as multiple-choice ("answerN: v" options, bare "the correct
  answer is answerN" gold; or, 'choice_value_first', the choice family's "v is answerN" layout
  with a gold that states the value first) and yes/no questions (or, 'yesno_value_first', with
  the yes/no family's "59, so yes" gold, false claims being other problems' answers), so the
  base model knows arithmetic and English-ish text but not the tasks' exact wording.

Everything is a pure function of (seed, split, size): the same seed gives the same problems on
every rank and every machine, and a split's first n problems do not depend on its size.

**No leaks.** Independent draws repeat prompts: with the default sizes and seed 0, 72 of 800 test
and 39 of 400 validation prompts also occurred verbatim in training, and ~1000 training prompts
twice. So every task prompt has one owner split (`owner`: a keyed hash, 10% test, 10% validation,
80% train), a split keeps only prompts it owns, and never one twice: train, validation and test
are disjoint by prompt whatever their sizes. The difficulty mix is kept: problem i of a split has
the operation it always had (drawn first, from the same stream), and a rejected draw is replaced
by another draw *of that operation*; the hash ignores what a prompt says, so each operation's
operands keep their distribution. A split larger than its share of an operation's distinct
prompts cannot be deduplicated: `generate` raises instead of repeating (`max_distinct`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from tcp.config.models import BASE_FORMATS

NAMES = ["Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea"]
ITEMS = ["apple", "coin", "book", "card", "pen", "shell", "stamp", "egg", "rock", "cup"]
SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003, "base": 3_000_017}
OWNER_SHARE = {"test": 0.1, "validation": 0.1, "train": 0.8}
"""The share of all task prompts each split owns (`owner`); the rest of a split's draws are
rejected. Evaluation splits get more than their size share so they can grow (up to
`max_distinct`)."""
MAX_DRAWS = 10_000
"""Draws tried for one problem before `generate` gives up (the split's share is exhausted)."""


@dataclass(frozen=True)
class Problem:
    """One generated problem."""

    prompt: str
    answer: str
    op: str
    key: str = ""
    """What a split owns and may not repeat (`owner`); empty: the prompt. A task whose prompt
    adds options or a claim to a question keys by the question, so one question never lands in
    two splits with different options."""

    @property
    def owner_key(self) -> str:
        """The text `owner` hashes and a split deduplicates: `key`, else the prompt."""
        return self.key or self.prompt


def operands(rng: random.Random, op: str) -> tuple[int, ...]:
    """Random operands of operation `op` (results stay small non-negative integers)."""
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


def result(op: str, xs: tuple[int, ...]) -> int:
    """The answer of `op` applied to `xs`."""
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


def make_problem(seed: int, split: str, index: int, draw: int = 0, *,
                 base_formats: tuple[str, ...] = ("equation", "word")) -> Problem:
    """Draw `draw` of problem `index` of `split` ('train' | 'validation' | 'test' | 'base') for
    `seed`. Every draw of an index has the same operation; draw 0 is the problem before splits
    were deduplicated, later draws replace it when it is rejected (`generate`). A 'base' problem
    takes one of `base_formats` (`BASE_FORMATS`) with equal odds."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSET)}, got {split!r}")
    rng = random.Random(f"{seed}/{SPLIT_OFFSET[split] + index}")
    op = rng.choice(OPS)
    if draw:
        rng = random.Random(f"{seed}/{SPLIT_OFFSET[split] + index}/{draw}")
    xs = operands(rng, op)
    answer = str(result(op, xs))
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if split == "base":
        fmt = base_formats[int(rng.random() * len(base_formats))]
        equation = SYMBOL[op].format(*xs) + "="
        if fmt == "word":
            return Problem(prompt=f"Q: {BASE[op](name, item, xs)}\nA: ", answer=answer, op=op)
        if fmt in ("choice", "choice_value_first", "choice_walk"):
            options = near_misses(rng, int(answer), 3)
            pos = rng.randrange(4)
            options.insert(pos, int(answer))
            gold = f"the correct answer is answer{pos + 1}"
            if fmt == "choice_walk":  # the choice family's layout (`choice_walk`)
                listed, gold = choice_walk(options, pos)
            elif fmt == "choice":
                listed = option_lines(options)
            else:  # choice_value_first (the earlier family layout): the label follows its value
                listed = "\n".join(f"{v} is answer{i + 1}" for i, v in enumerate(options))
                gold = f"{answer} is answer{pos + 1}, so {gold}"
            return Problem(prompt=f"Q: {equation}?\n{listed}\nA: ", answer=gold, op=op)
        if fmt == "yesno":
            yes = rng.random() < 0.5
            claim = int(answer) if yes else near_misses(rng, int(answer), 1)[0]
            return Problem(prompt=f"Q: Is {equation}{claim}?\nA: ", answer="yes" if yes else "no",
                           op=op)
        if fmt == "yesno_value_first":  # the yes/no family's layout: compute, then compare
            yes = rng.random() < 0.5
            claim = int(answer) if yes else other_answer(rng, op, int(answer))
            return Problem(prompt=f"Q: Is {equation}{claim}?\nA: ",
                           answer=f"{answer}, so {'yes' if yes else 'no'}", op=op)
        if fmt != "equation":
            raise ValueError(f"unknown base corpus format {fmt!r}; one of {BASE_FORMATS}")
        return Problem(prompt=f"Q: {equation}\nA: ", answer=answer, op=op)
    return Problem(prompt=f"Q: {TASK[op](name, item, xs)}\nA: ", answer=answer, op=op)


def option_lines(options: list[int]) -> str:
    """The options of a multiple-choice prompt, one per line: "answer1: 58\nanswer2: 59"."""
    return "\n".join(f"answer{i + 1}: {v}" for i, v in enumerate(options))


def choice_walk(options: list[int], pos: int) -> tuple[str, str]:
    """(the option lines of a prompt, the gold) of a multiple-choice problem whose right option
    is `options[pos]`, in the choice family's layout: options listed "answer2: 59", one per line;
    the gold states the computed value, then checks the options in order until the right one,
    then answers in the paper's format:
    "59. answer1: 58 no, answer2: 59 yes, so the correct answer is answer2".

    Each step is one the small Pilot can learn: copying the value listed after "answerK:"
    (matching a label and copying what follows it, as in the prompt), comparing it with the value
    written first (as the yes/no family does), and repeating the last label checked. Finding
    the label of a value directly ("59 is answer2", the earlier layout) is a lookup by a
    multi-character key that it never learned (docs/archive/results-history.md)."""
    checked = ", ".join(f"answer{i + 1}: {options[i]} {'yes' if i == pos else 'no'}"
                        for i in range(pos + 1))
    gold = f"{options[pos]}. {checked}, so the correct answer is answer{pos + 1}"
    return option_lines(options), gold


def other_answer(rng: random.Random, op: str, gold: int) -> int:
    """The answer of another problem of operation `op`, not `gold`: a wrong claim drawn like a
    right one, so neither its size nor its closeness to a copy of it gives the answer away."""
    for _ in range(1000):
        claim = result(op, operands(rng, op))
        if claim != gold:
            return claim
    raise RuntimeError(f"no answer of {op!r} other than {gold} in 1000 draws")  # pragma: no cover


MISS_STEPS = (1, 2, 10)
"""Spacings of the near misses (`near_misses`): off by one, by two, by ten."""


def near_misses(rng: random.Random, gold: int, k: int) -> list[int]:
    """`k` wrong answers near `gold`, in random order: with `gold` they form an evenly spaced
    run (spacing 1, 2 or 10) in which `gold` takes a random place, so the values alone do not
    single out the right one (it is not always the middle), and only the right answer rules
    the others out. All are >= 0: the spacing is drawn from those that let `gold` take any
    place (only golds below `k` sit low in their run more often)."""
    fits = [s for s in MISS_STEPS if gold - k * s >= 0]
    step = rng.choice(fits) if fits else MISS_STEPS[0]
    places = [j for j in range(k + 1) if gold - j * step >= 0]  # gold's rank in the run
    start = gold - rng.choice(places) * step
    misses = [start + i * step for i in range(k + 1) if start + i * step != gold]
    rng.shuffle(misses)
    return misses


def owner(seed: int, prompt: str) -> str:
    """The task split ('train' | 'validation' | 'test') that may use `prompt` under `seed`.

    A keyed hash (stable across processes, unlike `hash`) of the prompt alone: which split a
    prompt lands in says nothing about its operation or operands, so owning a share of the
    prompts does not change a split's distribution.
    """
    digest = hashlib.blake2b(f"{seed}\n{prompt}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    for split, share in OWNER_SHARE.items():
        if u < share:
            return split
        u -= share
    return "train"  # float rounding at the top end


def distinct_prompts(op: str) -> int:
    """How many different task prompts operation `op` can produce (names x items x operands)."""
    counts = {"add": 98 * 98, "sub": sum(range(10, 100)), "mul": 8 * 28, "div": 8 * 11,
             "two_step": sum(a + b for a in range(2, 61) for b in range(2, 41))}[op]
    return counts * len(NAMES) * len(ITEMS)


def max_distinct(split: str) -> int:
    """About the largest `split` whose prompts can all differ: its operations are equally likely,
    so the operation with the fewest prompts it owns (div) runs out first."""
    return min(int(distinct_prompts(op) * OWNER_SHARE[split]) for op in OPS) * len(OPS)


def generate(seed: int, split: str, size: int, *,
             base_formats: tuple[str, ...] = ("equation", "word")) -> list[dict[str, str]]:
    """`size` problems of `split` as records {'prompt', 'answer', 'op'}.

    Task splits are disjoint by prompt and free of repeats (module docstring); 'base' (the base
    model's corpus, other phrasings) is drawn as is. Raises ValueError when `split` cannot hold
    `size` distinct prompts.
    """
    if split == "base":
        return [record(make_problem(seed, split, i, base_formats=base_formats))
                for i in range(size)]
    return [record(p) for p in distinct_split(make_problem, seed, split, size, task="arithmetic")]


Maker = Callable[[int, str, int, int], Problem]
"""make(seed, split, index, draw) -> Problem: a task's generator (`make_problem`)."""


def distinct_split(make: Maker, seed: int, split: str, size: int, *, task: str) -> list[Problem]:
    """`size` problems of `split` from `make`, each the first draw of its index that `split`
    owns (`owner` of its `owner_key`) and has not used yet: disjoint splits, no repeats.
    Raises ValueError naming the size key to lower when the split's share runs out."""
    seen: set[str] = set()
    out = []
    for index in range(size):
        for draw in range(MAX_DRAWS):
            p = make(seed, split, index, draw)
            if p.owner_key not in seen and owner(seed, p.owner_key) == split:
                break
        else:
            key = {"train": "train_size", "validation": "val_size", "test": "test_size"}[split]
            why = (f"its {p.op} questions have {distinct_prompts(p.op)} distinct forms, "
                   f"{OWNER_SHARE[split]:.0%} of them reserved for {split}, so at most about "
                   f"{max_distinct(split)} {split} problems can differ" if p.op in TASK else
                   f"{OWNER_SHARE[split]:.0%} of its questions are reserved for {split} and "
                   f"{MAX_DRAWS} draws found no unused one")
            raise ValueError(
                f"the {task} task cannot give {split} problem {index} (seed {seed}) a question "
                f"no other split and no earlier {split} problem has: {why}; lower data.{key}")
        seen.add(p.owner_key)
        out.append(p)
    return out


def record(p: Problem) -> dict[str, str]:
    """`p` as a data record {'prompt', 'answer', 'op'}."""
    return {"prompt": p.prompt, "answer": p.answer, "op": p.op}
