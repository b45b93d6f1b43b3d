"""Answer formats: how a generated text is scored against the gold answer.

Each format turns a text into a canonical answer (or None when it holds none); a prediction is
correct when its canonical answer equals the gold's. The same parser reads the gold, so "answer2",
"Option 2" and "(B)" all mean choice 2.

- numeric  (GSM8K / SVAMP / MAWPS): the *last* number in the text; "1,234", "-3", "$5", "7.50",
  "3/4" are numbers; "42" and "42.0" are equal. GSM8K golds "... #### 42" parse to 42.
- choice   (the paper's "answer1/answer2/..." format, also "Option 2", "(B)", "B.", "answer: C"):
  a 1-based choice index; letters map A=1, B=2, ...
- yesno    (BoolQ): the first standalone yes/no/true/false word.
- exact    : whitespace-normalised, case-folded text with trailing punctuation stripped.
- auto     : numeric / yesno / choice when *every* gold of the split parses in that format,
  else exact (`infer_format`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

FORMATS = ("auto", "numeric", "choice", "yesno", "exact")

_NUM = re.compile(r"(?<![\w.])[-−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
                  r"|(?<![\w.])[-−]?\.\d+")
_GSM8K_FINAL = re.compile(r"####\s*(.+)$", re.S)


def parse_numeric(text: str) -> Fraction | None:
    """The last number in `text` as an exact Fraction (None: no number).

    GSM8K-style golds ("reasoning #### 42") use the part after "####".
    """
    m = _GSM8K_FINAL.search(text)
    if m:
        text = m.group(1)
    found = _NUM.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").replace("$", "").replace(" ", "").replace("−", "-")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_CHOICE_WORD = re.compile(r"\b(?i:answer|option|choice)(?:\s+is)?\s*[:#]?\s*\(?([1-9]\d?|[A-J])\)?"
                          r"(?!\w)")
_MARKED_LETTER = re.compile(r"\(([A-J])\)|(?:^|\s)([A-J])[).:](?=\s|$)")
_BARE = re.compile(r"\s*\(?([1-9]\d?|[A-Ja-j])[).:]?\s*")


def _choice_index(tok: str) -> int:
    return int(tok) if tok.isdigit() else ord(tok.upper()) - ord("A") + 1


def parse_choice(text: str) -> int | None:
    """The (1-based) option chosen in `text`, or None.

    Tried in order: the *last* "answerN" / "option N" / "the answer is B" mention (a model often
    restates options before choosing); the first marked capital letter ("(B)", "B)", "B.");
    a text that is only an option ("2", "c", "(D)"). A capital letter used as a word ("A dog")
    is not a choice.
    """
    words = _CHOICE_WORD.findall(text)
    if words:
        return _choice_index(words[-1])
    m = _MARKED_LETTER.search(text)
    if m:
        return _choice_index(m.group(1) or m.group(2))
    m = _BARE.fullmatch(text)
    if m:
        return _choice_index(m.group(1))
    return None


_YESNO = re.compile(r"\b(yes|no|true|false)\b", re.I)


def parse_yesno(text: str) -> bool | None:
    """The first standalone yes/no/true/false in `text` ("Yesterday" is not "yes")."""
    m = _YESNO.search(text)
    if not m:
        return None
    return m.group(1).lower() in ("yes", "true")


def parse_exact(text: str) -> str | None:
    """Case-folded text with whitespace collapsed and trailing punctuation removed."""
    s = " ".join(text.split()).casefold().rstrip(".!?;:,")
    return s or None


PARSERS: dict[str, Callable[[str], object]] = {
    "numeric": parse_numeric, "choice": parse_choice, "yesno": parse_yesno, "exact": parse_exact,
}

NO_ANSWER = {"numeric": "no number found", "choice": "no choice found",
             "yesno": "no yes/no/true/false found", "exact": "empty answer"}
"""Why a text holds no answer in each format (`AnswerScorer.parse_with_reason`)."""


def infer_format(golds: Sequence[str]) -> str:
    """The most specific format every gold answer parses in (numeric > yesno > choice > exact).

    A yes/no gold must be just the word; a choice gold must be a choice marker ("answer2",
    "B", "(C)", "option 3"), not a sentence that happens to contain a capital letter.
    """
    golds = [g for g in golds if g.strip()]
    if not golds:
        return "exact"
    if all(_is_bare_number(g) or _GSM8K_FINAL.search(g) for g in golds):
        return "numeric"
    if all(g.strip().strip(".").lower() in ("yes", "no", "true", "false") for g in golds):
        return "yesno"
    if all(_CHOICE_WORD.fullmatch(g.strip()) or _BARE.fullmatch(g) for g in golds) and \
            not all(g.strip().isdigit() for g in golds):
        return "choice"
    return "exact"


def _is_bare_number(s: str) -> bool:
    m = _NUM.fullmatch(s.strip().rstrip("."))
    return m is not None


class AnswerScorer:
    """Scores generated texts against gold answers in one format."""

    def __init__(self, fmt: str) -> None:
        if fmt not in PARSERS:
            raise ValueError(f"unknown answer format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.format = fmt
        self._parse = PARSERS[fmt]

    @classmethod
    def for_golds(cls, fmt: str, golds: Sequence[str]) -> AnswerScorer:
        """`fmt`, or the inferred format when fmt is 'auto'."""
        return cls(infer_format(golds) if fmt == "auto" else fmt)

    def parse(self, text: str) -> object:
        """The canonical answer of `text` (None: none found)."""
        return self._parse(text)

    def parse_with_reason(self, text: str) -> tuple[object, str | None]:
        """(canonical answer, None), or (None, why none parsed): what predictions.jsonl shows
        for an answer that scored wrong. Scoring (`correct`) is unchanged by it."""
        parsed = self._parse(text)
        if parsed is not None:
            return parsed, None
        if not text.strip():
            return None, "empty answer"
        return None, NO_ANSWER[self.format]

    def correct(self, pred: str, gold: str) -> bool:
        """True when `pred` holds the same answer as `gold` (never when either holds none)."""
        g = self._parse(gold)
        return g is not None and self._parse(pred) == g
