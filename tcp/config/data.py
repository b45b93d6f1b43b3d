"""`data`: where samples come from and how they become token sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tcp.config.schema import _check

BUILTIN = ("arithmetic", "multistep", "choice", "yesno")
"""`data.source` values generated in-process (tcp.data.families); they need no paths."""


@dataclass
class DataConfig:
    """Where samples come from and how they become token sequences."""

    source: Literal["arithmetic", "multistep", "choice", "yesno", "jsonl", "parquet",
                    "hf"] = "arithmetic"
    """'arithmetic' = the embedded default task; 'multistep' | 'choice' | 'yesno' = the built-in
    families (tcp.data.families: worked multi-step problems; multiple choice answered
    "59. answer1: 58 no, answer2: 59 yes, so the correct answer is answer2"; yes/no answered
    "59, so yes"); all four are generated, nothing downloaded.
    'jsonl'/'parquet' = local files; 'hf' = a dataset name for datasets.load_dataset (needs
    network or a local cache)."""
    train_path: str | None = None
    """jsonl/parquet: training file; hf: dataset name (e.g. 'gsm8k')."""
    val_path: str | None = None
    """jsonl/parquet: validation file; hf: unused (see hf_*_split)."""
    test_path: str | None = None
    """jsonl/parquet: test file."""
    hf_config: str | None = None
    """hf: dataset configuration name (e.g. 'main' for gsm8k)."""
    hf_train_split: str = "train"
    """hf: split used for training."""
    hf_val_split: str = "validation"
    """hf: split used for validation / choosing lambda."""
    hf_test_split: str = "test"
    """hf: split scored once at the end."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (ignored when prompt_template is set)."""
    answer_field: str = "answer"
    """Record field holding the answer."""
    prompt_template: str | None = None
    """Python format string over record fields, e.g. 'Q: {question}\\nA: '."""
    answer_template: str | None = None
    """Python format string over record fields for the answer, e.g. '{answer}'."""
    train_size: int = 20000
    """Built-in tasks: number of generated training problems."""
    val_size: int = 1200
    """Built-in tasks: validation problems (lambda is chosen here, eval.lambda_significance). With
    400, a real gain of 4-5 points could not be told from noise on one seed in three."""
    test_size: int = 800
    """Built-in tasks: test problems (scored once)."""
    max_length: int | Literal["auto"] = "auto"
    """Longest [BOS]+prompt+answer+EOS in tokens. 'auto': the 99.5th percentile of the training
    split's lengths rounded up to a multiple of 8, capped by the Pilot's context; resolved once
    when the run starts, printed, and saved as a number in config.yaml (tcp.data.prepare)."""
    overlength: Literal["skip", "truncate"] = "skip"
    """Samples over max_length: 'skip' drops them, 'truncate' cuts the prompt from the left.
    Either way they are counted and reported."""
    max_drop_frac: float = 0.01
    """Stop (data error, exit 2) when more than this share of the training or validation split
    is over max_length (skipped or truncated)."""
    max_unk_frac: float = 0.001
    """Stop (data error, exit 2) when more than this share of a split's tokens is the
    tokenizer's unknown token (text it cannot represent); counted only where one exists."""
    tokenizer: str | None = None
    """Tokenizer name/path; None uses the Pilot's, or builds the character tokenizer for the
    embedded default."""

    def __post_init__(self) -> None:
        _check(self.max_length == "auto" or self.max_length >= 4, "max_length",
               f"must be >= 4 or auto (got {self.max_length})")
        for k in ("max_drop_frac", "max_unk_frac"):
            _check(0 <= getattr(self, k) <= 1, k, f"must be in [0, 1] (got {getattr(self, k)})")
        for k in ("train_size", "val_size", "test_size"):
            _check(getattr(self, k) > 0, k, f"must be > 0 (got {getattr(self, k)})")
        if self.source in BUILTIN:
            for k in ("train_path", "val_path", "test_path"):
                _check(getattr(self, k) is None, k,
                       f"is set, but data.source={self.source} generates its data; unset it, or "
                       "set data.source=jsonl (or parquet) to train on files")
        if self.source in ("jsonl", "parquet"):
            _check(
                self.train_path is not None,
                "train_path",
                f"is required for source={self.source!r}; "
                f"set data.train_path=/path/train.{self.source}",
            )
        if self.source == "hf":
            _check(
                self.train_path is not None,
                "train_path",
                "is required for source='hf'; set it to the dataset name, "
                "e.g. data.train_path=gsm8k",
            )
