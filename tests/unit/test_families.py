"""The built-in task families (tcp.data.families): disjoint splits, balanced answers, answers
that are right, formats detected from train/validation, and the user-data path."""

import collections
import importlib.util
import itertools
import json
import re
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from tcp.config import load_config
from tcp.data import arithmetic, families
from tcp.data.loaders import DataError, load_split
from tcp.evaluation.answer_scoring import decide_format, parse_choice, parse_numeric, parse_yesno

ROOT = Path(__file__).resolve().parents[2]
SIZES = {"train": 3000, "validation": 400, "test": 800}


def _splits(task: str, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    return {s: families.generate(task, seed, s, n) for s, n in SIZES.items()}


def _question(task: str, prompt: str) -> str:
    """The arithmetic question inside a prompt (options and claims removed)."""
    q = prompt.removeprefix("Q: ").split("\n", 1)[0]
    return re.sub(r" Is the answer -?\d+\?$", "", q) if task == "yesno" else q


@pytest.mark.parametrize("task", families.FAMILIES)
def test_splits_share_no_question_and_repeat_none(task):
    splits = _splits(task)
    questions = {s: [_question(task, r["prompt"]) for r in rs] for s, rs in splits.items()}
    for s, qs in questions.items():
        assert len(set(qs)) == len(qs), f"{task} {s} repeats a question"
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])
    # deterministic; a split's first problems do not depend on its size; seeds differ
    assert families.generate(task, 0, "test", 50) == splits["test"][:50]
    assert families.generate(task, 1, "test", 50) != splits["test"][:50]


@pytest.mark.parametrize("task", families.FAMILIES)
def test_families_do_not_share_streams_with_the_default_task(task):
    default = {r["prompt"] for r in arithmetic.generate(0, "test", 800)}
    qs = [f"Q: {_question(task, r['prompt'])}\nA: " for r in families.generate(task, 0, "test",
                                                                               800)]
    assert sum(q in default for q in qs) < 40  # independent draws, not the same problems


OPTION_LINE = re.compile(r"^answer(\d): (-?\d+)$", re.M)


def _walk(prompt: str, answer: str) -> tuple[int, int]:
    """(stated value, chosen position) of a choice gold in the walk layout, checked against the
    prompt's options: the options are listed answer1..answer4 with four distinct values, the
    gold checks them in order with each value copied from its line, says "no" to every one
    before the first option equal to the stated value and "yes" to that one, then names it."""
    options = OPTION_LINE.findall(prompt)
    assert [int(i) for i, _ in options] == [1, 2, 3, 4]
    values = [int(v) for _, v in options]
    assert len(set(values)) == 4
    stated, steps, last = re.fullmatch(
        r"(-?\d+)\. ((?:answer\d: -?\d+ (?:yes|no), )+)so the correct answer is answer(\d)",
        answer).groups()
    checked = re.findall(r"answer(\d): (-?\d+) (yes|no), ", steps)
    pos = values.index(int(stated)) + 1
    assert [(int(i), int(v), w) for i, v, w in checked] == [
        (i + 1, values[i], "yes" if i + 1 == pos else "no") for i in range(pos)]
    assert int(last) == pos == parse_choice(answer)
    return int(stated), pos


def test_choice_positions_are_balanced_and_the_gold_option_is_right():
    for split, rs in _splits("choice").items():
        counts = collections.Counter(parse_choice(r["answer"]) for r in rs)
        assert set(counts) == {1, 2, 3, 4}
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        for r in rs:
            stated, _ = _walk(r["prompt"], r["answer"])
            assert all(int(v) >= 0 for _, v in OPTION_LINE.findall(r["prompt"]))
            assert stated == _solve(_question("choice", r["prompt"]))


def test_choice_walk_rejects_a_wrong_gold():
    """The checker above can fail: a gold naming another option, or skipping a step, is caught."""
    prompt = "Q: 7+5=?\nanswer1: 13\nanswer2: 12\nanswer3: 11\nanswer4: 10\nA: "
    assert _walk(prompt, "12. answer1: 13 no, answer2: 12 yes, so the correct answer is "
                         "answer2") == (12, 2)
    for bad in ("12. answer2: 12 yes, so the correct answer is answer2",
                "12. answer1: 13 no, answer2: 12 yes, so the correct answer is answer3",
                "12. answer1: 12 no, answer2: 12 yes, so the correct answer is answer2"):
        with pytest.raises(AssertionError):
            _walk(prompt, bad)


@pytest.mark.parametrize("task", ["choice", "yesno"])
def test_options_and_claims_do_not_give_the_answer_away(task):
    """The gold's rank among the options is about uniform, a false claim is as often above the
    answer as below it, and a split keeps the default task's operation mix however often its
    draws are rejected."""
    rs = families.generate(task, 0, "train", 4000)
    if task == "choice":
        ranks = collections.Counter()
        for r in rs:
            values = [int(v) for _, v in OPTION_LINE.findall(r["prompt"])]
            ranks[sorted(values).index(values[parse_choice(r["answer"]) - 1])] += 1
        assert all(0.2 < ranks[k] / len(rs) < 0.3 for k in range(4)), ranks
    else:
        above = [int(re.search(r"answer (\d+)\?", r["prompt"]).group(1))
                 > _solve(_question("yesno", r["prompt"])) for r in rs
                 if r["answer"].endswith("no")]
        assert 0.4 < sum(above) / len(above) < 0.6
    ops = collections.Counter(r["op"] for r in rs)
    assert all(0.17 < ops[op] / len(rs) < 0.23 for op in arithmetic.OPS), ops


def test_yesno_answers_are_balanced_and_true():
    for split, rs in _splits("yesno").items():
        counts = collections.Counter(parse_yesno(r["answer"]) for r in rs)
        assert abs(counts[True] - counts[False]) <= 1, (split, counts)
        for r in rs:
            claim = int(re.search(r"Is the answer (-?\d+)\?", r["prompt"]).group(1))
            truth = _solve(_question("yesno", r["prompt"]))
            assert r["answer"] == f"{truth}, so {'yes' if claim == truth else 'no'}"
            assert parse_yesno(r["answer"]) == (claim == truth)


def test_false_yesno_claims_are_drawn_like_right_answers_and_rarely_near_them():
    """A false claim is another problem's answer: per operation as large on average as a right
    answer (the claim alone tells nothing), and seldom a near miss of the right answer, so a
    Pilot that copies the claim as its value is wrong on the false claims (with near-miss
    claims the default Pilot copied on 96% of test problems)."""
    claims: dict[str, tuple[list[int], list[int]]] = collections.defaultdict(lambda: ([], []))
    near = false = 0
    for r in families.generate("yesno", 0, "train", 4000):
        claim = int(re.search(r"Is the answer (-?\d+)\?", r["prompt"]).group(1))
        truth = _solve(_question("yesno", r["prompt"]))
        claims[r["op"]][claim != truth].append(claim)
        if claim != truth:
            false += 1
            near += abs(claim - truth) in arithmetic.MISS_STEPS
    for op, (right, wrong) in claims.items():
        mean_right, mean_wrong = sum(right) / len(right), sum(wrong) / len(wrong)
        assert abs(mean_right - mean_wrong) < 0.15 * mean_right, (op, mean_right, mean_wrong)
    assert near / false < 0.2, near / false


def test_multistep_answers_show_every_step_and_end_in_the_result():
    forms = collections.Counter()
    for r in _splits("multistep")["train"]:
        forms[r["op"]] += 1
        work, final = r["answer"].split(" #### ")
        steps = work.rstrip(".").split(". ")
        assert len(steps) >= 2
        for step in steps:  # every intermediate quantity is right ...
            lhs, rhs = step.split("=")
            assert Fraction(eval(lhs)) == int(rhs), step
        # ... each step uses the previous one's result, and the last is the answer
        for prev, step in itertools.pairwise(steps):
            assert prev.split("=")[1] in step.split("=")[0]
        assert parse_numeric(r["answer"]) == int(final) == int(steps[-1].split("=")[1])
        # the numbers the first step starts from are in the question
        assert all(n in r["prompt"] for n in re.findall(r"\d+", steps[0].split("=")[0]))
    assert set(forms) == {"buy_give", "pool_split", "box_use_get"}


@pytest.mark.parametrize(("task", "fmt"), [("arithmetic", "numeric"), ("multistep", "numeric"),
                                           ("choice", "choice"), ("yesno", "yesno")])
def test_answer_format_is_detected_from_train_and_validation(task, fmt):
    splits = _splits(task)
    golds = [r["answer"] for s in ("train", "validation") for r in splits[s]]
    decision = decide_format("auto", golds)
    assert decision.format == fmt, decision.why
    assert "can never be scored" not in decision.why


@pytest.mark.parametrize("task", families.FAMILIES)
def test_a_family_runs_through_the_user_data_path_and_its_export_matches(task, tmp_path):
    cfg = load_config(ROOT / "configs" / f"{task}.yaml",
                      ["data.train_size=300", "data.val_size=40", "data.test_size=60"])
    assert cfg.data.source == task
    generated = {s: load_split(cfg.data, s, seed=cfg.seed) for s in SIZES}
    spec = importlib.util.spec_from_file_location("export_task", ROOT / "tools" /
                                                  "export_task.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert mod.main([task, "--out", str(tmp_path), "--seed", str(cfg.seed), "--train-size",
                     "300", "--val-size", "40", "--test-size", "60"]) == 0
    files = load_config(ROOT / "configs" / f"{task}.yaml", [
        "data.source=jsonl", f"data.train_path={tmp_path}/train.jsonl",
        f"data.val_path={tmp_path}/validation.jsonl", f"data.test_path={tmp_path}/test.jsonl"])
    for split in SIZES:
        assert load_split(files.data, split, seed=cfg.seed) == generated[split]
    line = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])
    assert set(line) == {"prompt", "answer", "op"}


def test_a_split_too_large_is_a_data_error_naming_the_key():
    cfg = load_config(ROOT / "configs" / "default.yaml", ["data.val_size=5800"])
    with pytest.raises(DataError, match=r"arithmetic task .* at most about 5280 validation "
                                        r"problems can differ; lower data\.val_size"):
        load_split(cfg.data, "validation", seed=0)


def test_builtin_sources_are_the_default_task_and_the_families():
    from typing import get_args, get_type_hints

    from tcp.config.data import BUILTIN, DataConfig

    assert BUILTIN == ("arithmetic", *families.FAMILIES)
    assert set(BUILTIN) <= set(get_args(get_type_hints(DataConfig)["source"]))
    with pytest.raises(Exception, match=r"data\.train_path.* data.source=choice generates"):
        load_config(ROOT / "configs" / "choice.yaml", ["data.train_path=x.jsonl"])


def test_base_corpus_formats():
    recs = arithmetic.generate(1234, "base", 700, base_formats=arithmetic.BASE_FORMATS)
    kinds = collections.Counter(
        "choice" if r["answer"].startswith("the correct") else
        "choice_walk" if " yes, so the correct answer" in r["answer"] else
        "choice_value_first" if "correct answer" in r["answer"] else
        "yesno" if r["answer"] in ("yes", "no") else
        "yesno_value_first" if r["answer"].endswith((", so yes", ", so no")) else
        "equation" if r["prompt"].rstrip().endswith("=\nA:") else "word" for r in recs)
    assert set(kinds) == set(arithmetic.BASE_FORMATS) and min(kinds.values()) > 70  # ~100 each
    for r in recs:
        if r["answer"] in ("yes", "no"):
            eq = re.fullmatch(r"Q: Is (.+)=(-?\d+)\?\nA: ", r["prompt"])
            assert (Fraction(eval(eq.group(1))) == int(eq.group(2))) == (r["answer"] == "yes")
        elif r["answer"].endswith((", so yes", ", so no")):  # the yes/no family's gold
            eq = re.fullmatch(r"Q: Is (.+)=(-?\d+)\?\nA: ", r["prompt"])
            value, word = r["answer"].split(", so ")
            assert Fraction(eval(eq.group(1))) == int(value)
            assert (int(value) == int(eq.group(2))) == (word == "yes")
        elif " yes, so the correct answer" in r["answer"]:  # the choice family's walk
            eq = re.fullmatch(r"Q: (.+)=\?\n((?:answer\d: -?\d+\n){4})A: ", r["prompt"])
            value, _ = _walk(r["prompt"], r["answer"])
            assert Fraction(eval(eq.group(1))) == value
        elif "correct answer" in r["answer"] and not r["answer"].startswith("the"):
            # the earlier choice layout: the gold states the right value, then the label that
            # follows that value among the options, then the paper's sentence
            eq = re.fullmatch(r"Q: (.+)=\?\n((?:-?\d+ is answer\d\n){4})A: ", r["prompt"])
            value, label = re.fullmatch(r"(-?\d+) is answer(\d), so the correct answer is "
                                        r"answer\2", r["answer"]).groups()
            assert Fraction(eval(eq.group(1))) == int(value)
            assert f"\n{value} is answer{label}\n" in "\n" + eq.group(2)
    # the default two formats: equations and base phrasings only
    old = arithmetic.generate(1234, "base", 50)
    assert all(not r["answer"].startswith("the") and r["answer"] not in ("yes", "no")
               for r in old)


def _solve(question: str) -> int:
    """The answer of a default-task question, solved from its words (independent of the
    generator's own arithmetic)."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "gets" in question:
        return n[0] + n[1]
    if "gave away" in question:
        return n[0] - n[1]
    if "bags of" in question:
        return n[0] * n[1]
    if "equal piles" in question:
        return n[0] // n[1]
    if "finds" in question:
        return n[0] + n[1] - n[2]
    raise AssertionError(question)
