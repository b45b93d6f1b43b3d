"""`eval`: fused decoding and scoring (docs/method.md §6, §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcp.config.schema import _check


@dataclass
class EvalConfig:
    """Fused decoding and scoring (docs/method.md §6, §7)."""

    lambdas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0])
    """lambda grid tried on validation; the best is used once on test."""
    lambda_significance: float | None = 0.05
    """A lambda > 0 is a candidate only if it beats the Pilot on validation beyond noise: exact
    McNemar p of the answers it fixed against those it broke below this value divided by the
    number of lambdas tried (Bonferroni); the most accurate candidate is used, else the Copilot
    is off (lambda 0). null: the most accurate lambda whenever it beats the Pilot by one answer
    (on a few hundred validation examples that lets noise turn on a Copilot that hurts)."""
    fusion: Literal["probs", "logits"] = "probs"
    """'probs': p~ = p_hat + lambda f; 'logits': z + lambda f."""
    copilot_feedback: Literal["prediction", "realised"] = "prediction"
    """What the Copilot reads as the previous position's error while decoding. 'prediction'
    (the paper): its own previous output f_{i-1}. 'realised': the error the Pilot made on the
    token actually emitted, onehot(y_{i-1}) - p_hat_{i-1}, the same quantity it was trained on
    (where y is the teacher-forced token); a dense (rows, V) tensor like f itself."""
    max_new_tokens: int | Literal["auto"] = "auto"
    """Decoding budget per answer. 'auto' sizes it from the tokenized training and validation
    answers (the longest, plus the longest stop string's tokens and 1 for EOS), capped by the
    Pilot's context minus the longest prompt; the choice is printed. A number wins."""
    truncation_warn_frac: float = 0.05
    """Warn (or, with strict, fail) when more than this share of a split's generations end on
    the budget without EOS or a stop string."""
    strict: bool = False
    """Truncation over truncation_warn_frac fails the run (exit 2, after results are written)
    instead of warning."""
    batch_size: int = 64
    """Prompts per rank per decoding batch."""
    enabled: bool = True
    """Evaluate at the end of training."""
    answer_format: Literal["auto", "numeric", "choice", "yesno", "exact"] = "auto"
    """How answers are scored (tcp.evaluation.answer_scoring): 'numeric' (last
    number; GSM8K/SVAMP/MAWPS), 'choice' ("answer2", "option 2", "(B)", "... is answer2"),
    'yesno' (BoolQ), 'exact';
    'auto' decides from the training and validation golds only (never test): the format at
    least 95% of them parse in (numeric, then yes/no, then choice), else 'exact'; the decision
    and why go to results.json["answer_format"]."""
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    """Decoding on the fused distribution: argmax, sampling, or beam search."""
    num_beams: int = 4
    """strategy=beam: beams per prompt (the paper uses 4)."""
    length_penalty: float = 1.0
    """strategy=beam: finished beams are ranked by log-prob / length**length_penalty."""
    temperature: float = 1.0
    """strategy=sample: p~ ** (1 / temperature), renormalised."""
    top_k: int = 0
    """strategy=sample: keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """strategy=sample: keep the smallest set with probability >= top_p (1.0: all)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: a row ends once its decoded text contains one (cut before it), e.g.
    ["\\n"]. EOS always ends a row."""

    def __post_init__(self) -> None:
        _check(len(self.lambdas) > 0, "lambdas", "must list at least one value, e.g. [0.5, 1.0]")
        _check(all(x > 0 for x in self.lambdas), "lambdas", "values must be > 0")
        _check(self.lambda_significance is None or 0 < self.lambda_significance <= 1,
               "lambda_significance",
               f"must be in (0, 1] or null (got {self.lambda_significance!r}), e.g. 0.05")
        _check(self.max_new_tokens == "auto" or self.max_new_tokens > 0, "max_new_tokens",
               f"must be > 0 or 'auto' (got {self.max_new_tokens!r})")
        _check(0 <= self.truncation_warn_frac <= 1, "truncation_warn_frac",
               f"must be in [0, 1] (got {self.truncation_warn_frac}), e.g. 0.05")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.num_beams >= 1, "num_beams", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0 (use strategy=greedy for 0)")
        _check(self.top_k >= 0, "top_k", "must be >= 0 (0 keeps every token)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be a list of non-empty strings, e.g. ['\\n']")
