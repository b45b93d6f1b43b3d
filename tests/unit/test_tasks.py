"""Answer parsers (tcp.evaluation.answer_scoring) on hand-written tricky outputs."""

from fractions import Fraction

import pytest

from tcp.evaluation.answer_scoring import (
    AnswerScorer,
    decide_format,
    infer_format,
    looks_like,
    parse_choice,
    parse_numeric,
    parse_yesno,
)


@pytest.mark.parametrize("text,want", [
    ("42", 42), ("The answer is 42.", 42), ("12 apples and 3 are left", 3),
    ("1,234 apples", 1234), ("$5.50", Fraction(11, 2)), ("-3", -3), ("−7 degrees", -7),
    ("3/4 of a cup", Fraction(3, 4)), ("42.0", 42), ("x = .5", Fraction(1, 2)),
    ("He paid 3 dollars.\n#### 1,000", 1000), ("no digits here", None), ("a5b", None),
    ("7/0", None),
])
def test_numeric_takes_the_last_number(text, want):
    assert parse_numeric(text) == want


@pytest.mark.parametrize("text,want", [
    ("answer2", 2), ("Answer: answer3", 3), ("answer1 is wrong, so answer3", 3),
    ("The answer is B.", 2), ("(C) because it rains", 3), ("B) 42", 2), ("Option 4", 4),
    ("I think (B)", 2), ("d", 4), ("The answer is 2", 2), ("answer: C", 3),
    ("A dog barks", None), ("the answer is a dog", None), ("", None),
])
def test_choice_formats(text, want):
    assert parse_choice(text) == want


@pytest.mark.parametrize("text,want", [
    ("Yes", True), ("No, it is not.", False), ("True.", True), ("false", False),
    ("Yesterday it rained", None), ("I'm not sure", None), ("yes and no", True),
    ("Answer: no", False), ("nothing", None),
])
def test_yes_no(text, want):
    assert parse_yesno(text) == want


def test_scorer_compares_canonical_answers():
    num = AnswerScorer("numeric")
    assert num.correct("So she has 1,200.", "1200") and num.correct(" 42 ", "42")
    assert not num.correct("421", "42") and not num.correct("", "42")
    mc = AnswerScorer("choice")
    assert mc.correct("(B)", "answer2") and mc.correct("option 2", "B")
    assert not mc.correct("A dog", "answer1")
    yn = AnswerScorer("yesno")
    assert yn.correct("True", "yes") and not yn.correct("Yesterday", "yes")
    ex = AnswerScorer("exact")
    assert ex.correct(" Paris. ", "paris") and not ex.correct("Paris, France", "Paris")
    assert not ex.correct("", "")  # an empty gold never matches
    with pytest.raises(ValueError, match="unknown answer format 'numbers'"):
        AnswerScorer("numbers")


def test_infer_format_picks_the_shape_of_the_golds():
    assert infer_format(["1", "20", "-3"]) == "numeric"  # digits read as options too: numeric
    assert infer_format(["Q #### 18", "#### 7"]) == "numeric"
    assert infer_format(["yes", "No"]) == "yesno"
    assert infer_format(["59, so yes", "12, so no."]) == "yesno"  # reasoning, then the word
    assert infer_format(["no, it is yes", "yes"]) == "exact"  # two answers in one gold
    assert infer_format(["No, it is in Reno.", "Yes, she closed her eyes"]) == "exact"
    assert infer_format(["It rained all day.", "The cat sat, so no"]) == "exact"  # 50% < 95%
    assert infer_format(["answer1", "answer3"]) == "choice"
    assert infer_format(["B", "(C)"]) == "choice"
    assert infer_format(["Paris", "Rome"]) == "exact"
    assert infer_format(["12", "twelve"]) == "exact"
    assert infer_format([]) == infer_format(["  "]) == "exact"
    assert AnswerScorer.for_golds("auto", ["answer2"]).format == "choice"
    assert AnswerScorer.for_golds("exact", ["42"]).format == "exact"


@pytest.mark.parametrize("gold", [
    "answer2", "answer2.", "Answer 2", "the correct answer is answer2", "option 3", "Option 3.",
    "(B)", "The answer is (B).", "answer: C", "C", "choice 4",
])
def test_paper_multiple_choice_golds_are_choices(gold):
    """The paper's answerN (alone or in a sentence), option N and (B): once 'exact' for some."""
    assert looks_like("choice", gold) and infer_format([gold, "answer1"]) == "choice"
    assert AnswerScorer("choice").correct(f"option {parse_choice(gold)}", gold)


@pytest.mark.parametrize("gold", ["A dog", "answer 2 is wrong, it is 3", "the answer is a dog",
                                  "Paris"])
def test_sentences_that_merely_mention_options_are_not_choices(gold):
    assert not looks_like("choice", gold)


def test_auto_needs_95_percent_and_says_why():
    mc = [f"answer{i % 4 + 1}" for i in range(1164)] + ["none of the above"] * 36
    d = decide_format("auto", mc)
    assert d.to_dict() == {"format": "choice", "why": (
        "auto: 97% of 1200 train+validation golds look like a choice (answerN, option N, (B)); "
        "36 hold no choice answer and can never be scored correct")}
    # 94.7% is below the bar, and never reads as 95%
    d = decide_format("auto", ["42"] * 18 + ["n/a"], source="validation")
    assert d.format == "exact" and d.why == (
        "auto: no format fits 95% of the 19 validation golds (a number 94%, yes/no 0%, "
        "a choice (answerN, option N, (B)) 94%); exact match")
    assert decide_format("auto", ["42"] * 19 + ["n/a"]).format == "numeric"  # exactly 95%
    assert decide_format("numeric", ["Paris"]).to_dict() == {
        "format": "numeric", "why": "set by eval.answer_format"}
