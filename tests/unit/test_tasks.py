"""Answer parsers (tcp.tasks) on hand-written tricky outputs."""

from fractions import Fraction

import pytest

from tcp.tasks import AnswerScorer, infer_format, parse_choice, parse_numeric, parse_yesno


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


def test_infer_format_needs_every_gold():
    assert infer_format(["1", "20", "-3"]) == "numeric"
    assert infer_format(["Q #### 18", "#### 7"]) == "numeric"
    assert infer_format(["yes", "No"]) == "yesno"
    assert infer_format(["answer1", "answer3"]) == "choice"
    assert infer_format(["B", "(C)"]) == "choice"
    assert infer_format(["Paris", "Rome"]) == "exact"
    assert infer_format(["12", "twelve"]) == "exact"
    assert AnswerScorer.for_golds("auto", ["answer2"]).format == "choice"
    assert AnswerScorer.for_golds("exact", ["42"]).format == "exact"
