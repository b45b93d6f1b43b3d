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
- auto     : decided from the training and validation golds, never test ones (`decide_format`):
  of numeric / yesno / choice, the one the most golds look like (ties in that order), when at
  least 95% of them do (`AUTO_MIN_PERCENT`: a few odd golds do not make a multiple-choice set
  "exact"); else exact. A choice gold is an option ("answer2", "option 3", "(B)", "C") or a
  sentence ending in one ("the correct answer is answer2").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


AUTO_MIN_PERCENT = 95
"""'auto' picks a format only when at least this percentage of the golds look like it."""

SHAPES = {"numeric": "a number", "yesno": "yes/no", "choice": "a choice (answerN, option N, (B))"}
"""What a gold of each format looks like, in `FormatDecision.why`; also the tie order."""

_ENDS_IN_OPTION = re.compile(r"\([A-J]\)$")


@dataclass(frozen=True)
class FormatDecision:
    """The answer format evaluation scores in, and why (results.json `answer_format`)."""

    format: str
    why: str

    def to_dict(self) -> dict[str, str]:
        """{'format', 'why'}, as results.json records it."""
        return {"format": self.format, "why": self.why}


def looks_like(fmt: str, gold: str) -> bool:
    """Whether `gold` is written as an answer of `fmt` ('numeric' | 'yesno' | 'choice'), not just
    parseable in it: "42", "#### 42"; "Yes.", "59, so no" (a sentence ending in its only yes/no
    word); "answer2", "(B)", "the correct answer is answer2".
    """
    g = gold.strip()
    if fmt == "numeric":
        return _is_bare_number(g) or _GSM8K_FINAL.search(g) is not None
    if fmt == "yesno":
        words = list(_YESNO.finditer(g))
        return len(words) == 1 and words[0].end() == len(g.rstrip(".!"))
    g = g.rstrip(".!")
    return (_BARE.fullmatch(g) is not None or _ENDS_IN_OPTION.search(g) is not None
            or any(m.end() == len(g) for m in _CHOICE_WORD.finditer(g)))


def decide_format(fmt: str, golds: Sequence[str], *,
                  source: str = "train+validation") -> FormatDecision:
    """`fmt`, or for 'auto' the format of `golds` (module docstring), with the reason.

    `golds` must not include test answers: the format is part of the scoring rule, fixed before
    test is read. `source` names where they come from, for the reason.
    """
    if fmt != "auto":
        return FormatDecision(fmt, "set by eval.answer_format")
    golds = [g for g in golds if g.strip()]
    if not golds:
        return FormatDecision("exact", f"auto: no non-empty {source} golds; exact match")
    counts = {f: sum(looks_like(f, g) for g in golds) for f in SHAPES}
    best = max(SHAPES, key=lambda f: counts[f])  # first of the tied: numeric > yesno > choice
    n = len(golds)
    if 100 * counts[best] < AUTO_MIN_PERCENT * n:
        seen = ", ".join(f"{SHAPES[f]} {_percent(counts[f], n)}" for f in SHAPES)
        return FormatDecision("exact", f"auto: no format fits {AUTO_MIN_PERCENT}% of the {n} "
                                       f"{source} golds ({seen}); exact match")
    why = f"auto: {_percent(counts[best], n)} of {n} {source} golds look like {SHAPES[best]}"
    lost = sum(PARSERS[best](g) is None for g in golds)
    if lost:
        why += f"; {lost} hold no {best} answer and can never be scored correct"
    return FormatDecision(best, why)


def _percent(k: int, n: int) -> str:
    """k/n as a whole percentage rounded down, so a share under the threshold never reads as it."""
    return f"{100 * k // n}%"


def infer_format(golds: Sequence[str]) -> str:
    """The format 'auto' picks for `golds` (`decide_format`)."""
    return decide_format("auto", golds).format


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
        """`fmt`, or the format 'auto' picks for `golds` (`decide_format`)."""
        return cls(decide_format(fmt, golds).format)

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
