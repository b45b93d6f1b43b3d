"""Results a user can trust: the built-in task's splits share no prompt, and evaluation fixes
everything it chooses (the answer format, λ) before it reads the test split."""

import pytest
import torch

import tcp.evaluation.protocol
from tcp.config import load_config
from tcp.data import arithmetic
from tcp.data.collate import tokenize_records
from tcp.evaluation.protocol import evaluate_and_report
from tcp.models.pilot import PilotTap
from tests.helpers import tiny_copilot, tiny_pilot

CPU = torch.device("cpu")
SHIPPED_SEEDS = (0, 1, 2)
"""configs/*.yaml run seed 0; docs/results.md and its transfer runs use seeds 0, 1 and 2."""


# ------------------------------------------------------------------ disjoint splits
def _default_sizes() -> dict[str, int]:
    d = load_config("configs/default.yaml").data
    return {"train": d.train_size, "validation": d.val_size, "test": d.test_size}


@pytest.mark.parametrize("seed", SHIPPED_SEEDS)
def test_builtin_splits_are_disjoint_by_prompt(seed):
    sizes = _default_sizes()
    splits = {s: arithmetic.generate(seed, s, n) for s, n in sizes.items()}
    prompts = {s: [r["prompt"] for r in rs] for s, rs in splits.items()}
    for s, n in sizes.items():
        assert len(prompts[s]) == n and len(set(prompts[s])) == n, f"{s} repeats a prompt"
    train = set(prompts["train"])
    assert not train & set(prompts["validation"])
    assert not train & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])
    # the difficulty mix is the undeduplicated one: problem i keeps its operation
    for s, rs in splits.items():
        assert [r["op"] for r in rs] == [arithmetic.make_problem(seed, s, i).op
                                         for i in range(len(rs))]
    # deterministic, and a split's first problems do not depend on its size (tcp-eval --limit)
    assert arithmetic.generate(seed, "test", 50) == splits["test"][:50]


def test_a_split_too_large_to_be_distinct_fails_clearly():
    limit = arithmetic.max_distinct("validation")
    assert limit == 5280 and arithmetic.max_distinct("train") == 42240
    with pytest.raises(ValueError, match=r"at most about 5280 validation .* lower data\.val_size"):
        arithmetic.generate(0, "validation", limit + 500)


# ------------------------------------------------------------------ test read last
class Watched(list):
    """A list that notes its name in `events` the first time anything reads it (iteration,
    indexing, len, truth, `in`, concatenation on either side)."""

    def __init__(self, items: list, events: list[str], name: str) -> None:
        super().__init__(items)
        self._events, self._name = events, name

    def _read(self) -> None:
        if self._name not in self._events:
            self._events.append(self._name)

    def __iter__(self):
        self._read()
        return super().__iter__()

    def __getitem__(self, i):
        self._read()
        return super().__getitem__(i)

    def __len__(self) -> int:
        self._read()
        return super().__len__()

    def __contains__(self, x) -> bool:
        self._read()
        return super().__contains__(x)

    def __add__(self, other):
        self._read()
        return super().__add__(other)

    def __radd__(self, other):
        self._read()
        return [*other, *super().__iter__()]


VAL = [{"prompt": f"Q: {a}+{b}=\nA: ", "answer": str(a + b)} for a, b in ((3, 4), (12, 5))]
TEST = [{"prompt": f"Q: pick {i}\nA: ", "answer": f"answer{i}"} for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    pilot, tok = tiny_pilot(seed=0)
    return pilot, tok, tiny_copilot(pilot.config.vocab_size, pilot.config.hidden_size,
                                    randomize_head=True)


def _evaluate(tmp_path, models, test_records, **kw) -> dict:
    pilot, tok, copilot = models
    cfg = load_config(None, [f"output_dir={tmp_path}", "eval.lambdas=[0.5,1.0]",
                             "eval.batch_size=2", "eval.max_new_tokens=4",
                             "data.max_length=96"])
    samples, _ = tokenize_records(VAL, tok, max_length=cfg.data.max_length)
    tap = PilotTap(pilot)
    try:
        return evaluate_and_report(cfg, pilot=pilot, copilot=copilot, tap=tap, tokenizer=tok,
                                   val_records=VAL, test_records=test_records,
                                   val_samples=samples, rank=0, world=1, device=CPU, **kw)
    finally:
        tap.remove()


def test_test_split_is_read_only_after_lambda_is_chosen(tmp_path, models, monkeypatch):
    events: list[str] = []
    choose = tcp.evaluation.protocol.choose_lambda

    def chosen(val, significance=None):
        out = choose(val, significance)
        events.append("lambda chosen")
        return out

    monkeypatch.setattr(tcp.evaluation.protocol, "choose_lambda", chosen)
    res = _evaluate(tmp_path, models, Watched(TEST, events, "test read"))
    assert events == ["lambda chosen", "test read"], events
    # the answer format came from validation alone: numbers, though test golds are choices
    assert res["answer_format"] == {"format": "numeric",
                                    "why": "auto: 100% of 2 validation golds look like a number"}
    assert res["decoding"]["answer_format"] == "numeric" and res["test_size"] == 3


def test_answer_format_is_decided_on_train_and_validation_golds(tmp_path, models):
    # validation's "7" and "17" read as options too; 2 of 60 golds do not
    train = [f"the correct answer is answer{i % 4 + 1}" for i in range(56)] + ["none"] * 2
    res = _evaluate(tmp_path, models, [dict(r, answer=str(i)) for i, r in enumerate(TEST)],
                    train_golds=train, lam=0.5)
    assert res["answer_format"] == {
        "format": "choice", "why": "auto: 96% of 60 train+validation golds look like a choice "
        "(answerN, option N, (B)); 2 hold no choice answer and can never be scored correct"}
    assert res["decoding"]["answer_format"] == "choice"
