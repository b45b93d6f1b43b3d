"""The decoding budget (`eval.max_new_tokens`) and truncation at it: never silent.

`eval.max_new_tokens: auto` sizes the budget from answers the run has tokenized (training and
validation; `tcp-eval` uses what it can load, see `tcp.cli.tcp_eval`): the longest answer in tokens
(EOS excluded) plus a margin of the longest stop string's tokens and 1 for EOS, capped by the
Pilot's context minus the longest prompt (decoder-only Pilots; an encoder-decoder Pilot reads
the prompt in its encoder, so its cap is `data.max_length`, the longest target it trained on).
An explicit number wins. It is resolved once, where the tokenizer and data are at hand
(`tcp.training.joint_job.run`, `tcp.evaluation.run_loading.evaluate_run`), and printed.

Evaluation counts the generations that end on the budget without EOS or a stop string, per
split (`truncation_summary`); when a split's share exceeds `eval.truncation_warn_frac` the
printed table carries one warning naming `eval.max_new_tokens`, and with `eval.strict` the run
fails after writing its results (`check_truncation` raises `TruncationError`; both CLIs map it
to exit code 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tcp.config import EvalConfig
from tcp.data.collate import TokenizedSample
from tcp.errors import RunError

if TYPE_CHECKING:  # annotations only; both are heavy (torch, transformers)
    import torch

    from tcp.evaluation.generation_eval import GenResult


class TruncationError(RunError):
    """eval.strict: too many generations ended on the decoding budget (exit code 2)."""

    kind = "evaluation"


@dataclass
class DecodeBudget:
    """The resolved `eval.max_new_tokens` and where it came from."""

    tokens: int
    """The budget decoding uses (max new tokens per answer)."""
    requested: int | str
    """What the config asked for: 'auto' or a number."""
    splits: list[str]
    """Splits whose answers were measured (empty: none were)."""
    longest_answer: int | None = None
    """Longest measured answer in tokens, EOS excluded."""
    margin: int | None = None
    """auto: tokens added for EOS (1) and the longest stop string."""
    cap: int | None = None
    """auto: the Pilot's room for new tokens (context minus the longest prompt)."""

    @property
    def auto(self) -> bool:
        return self.requested == "auto"

    def describe(self) -> str:
        """One line, e.g. "eval.max_new_tokens=auto -> 23 (longest train/validation answer 21
        tokens + 2 margin for EOS and stop strings)"."""
        where = f"longest {'/'.join(self.splits)} answer {self.longest_answer} tokens"
        if not self.auto:
            if self.longest_answer is None:
                return f"eval.max_new_tokens={self.tokens} (set in the config)"
            text = f"eval.max_new_tokens={self.tokens} (set in the config; {where})"
            if self.tokens < self.longest_answer + 1:
                text += (f"; shorter than the longest answer + EOS ({self.longest_answer + 1}): "
                         "answers will be cut; eval.max_new_tokens=auto sizes it from the data")
            return text
        assert self.longest_answer is not None and self.margin is not None
        what = "EOS and stop strings" if self.margin > 1 else "EOS"
        text = (f"eval.max_new_tokens=auto -> {self.tokens} "
                f"({where} + {self.margin} margin for {what}")
        if self.cap is not None and self.cap < self.longest_answer + self.margin:
            text += f"; capped by the Pilot's context at {self.cap}"
        return text + ")"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"description": self.describe()}


def answer_lengths(samples: list[TokenizedSample]) -> tuple[int, int]:
    """(longest answer in tokens without EOS, longest prompt in tokens) of tokenized samples."""
    if not samples:
        return 0, 0
    return (max(len(s.input_ids) - s.prompt_len - 1 for s in samples),
            max(s.prompt_len for s in samples))


def pilot_context(model: torch.nn.Module, *, max_length: int) -> tuple[int, bool]:
    """(the Pilot's context in tokens, encoder-decoder?): `max_position_embeddings` or
    `n_positions` of its config; `max_length` for encoder-decoders or when the config names
    none. `model` may be a DeepSpeed engine."""
    conf = getattr(getattr(model, "module", model), "config", None)
    if conf is None or getattr(conf, "is_encoder_decoder", False):
        return max_length, conf is not None
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return v, False
    return max_length, False


def resolve_budget(ev: EvalConfig, samples: dict[str, list[TokenizedSample]], tokenizer: Any,
                   *, context: int, encoder_decoder: bool = False) -> DecodeBudget:
    """`ev.max_new_tokens` as a number. `samples`: tokenized answers per split name (measured
    for 'auto', reported beside an explicit number); `context`: see `pilot_context`."""
    used = {k: v for k, v in samples.items() if v}
    lengths = [answer_lengths(v) for v in used.values()]
    longest = max((a for a, _ in lengths), default=None)
    if ev.max_new_tokens != "auto":
        return DecodeBudget(tokens=int(ev.max_new_tokens), requested=int(ev.max_new_tokens),
                            splits=list(used), longest_answer=longest)
    if longest is None:
        raise ValueError("eval.max_new_tokens=auto: no tokenized answers to size the decoding "
                         f"budget from (splits {', '.join(samples) or 'none'} are empty); set "
                         "eval.max_new_tokens to a number")
    stop = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in ev.stop),
               default=0)
    margin = stop + 1
    prompt = max(p for _, p in lengths)
    cap = max(1, context if encoder_decoder else context - prompt)
    return DecodeBudget(tokens=min(longest + margin, cap), requested="auto", splits=list(used),
                        longest_answer=longest, margin=margin, cap=cap)


def budget_for_pilot(ev: EvalConfig, samples: dict[str, list[TokenizedSample]], tokenizer: Any,
                     *, pilot: torch.nn.Module, max_length: int) -> DecodeBudget:
    """`resolve_budget` capped by `pilot`'s own context (`pilot_context`)."""
    context, encdec = pilot_context(pilot, max_length=max_length)
    return resolve_budget(ev, samples, tokenizer, context=context, encoder_decoder=encdec)


def truncation_summary(splits: dict[str, GenResult], ev: EvalConfig, *, budget: int,
                       lam: float) -> dict[str, Any]:
    """Per split: the generations behind the reported numbers (the Pilot's, lambda 0, and
    Pilot+Copilot's at the chosen `lam`), how many ended on the budget and their share, plus
    the count at every lambda decoded (a lambda the sweep rejected may run on without
    misleading anyone: it shows in the sweep table); the splits over
    `ev.truncation_warn_frac` and the one warning to print (None: none)."""
    out: dict[str, Any] = {"threshold": ev.truncation_warn_frac, "strict": ev.strict,
                           "counted_lambdas": sorted({0.0, lam})}
    over = []
    for name, r in splits.items():
        idx = [i for i, lv in enumerate(r.lambdas) if lv in (0.0, lam)]
        gens, cut = r.n * len(idx), sum(r.truncated[i] for i in idx)
        share = cut / gens if gens else 0.0
        out[name] = {"generations": gens, "truncated": cut, "share": share,
                     "by_lambda": [{"lambda": lv, "truncated": c}
                                   for lv, c in zip(r.lambdas, r.truncated, strict=True)]}
        if share > ev.truncation_warn_frac:
            over.append(f"{share:.1%} of {name} generations ({cut}/{gens})")
    out["over_threshold"] = [n for n in splits if out[n]["share"] > ev.truncation_warn_frac]
    out["warning"] = None if not over else (
        f"{' and '.join(over)} ended on the decoding budget eval.max_new_tokens={budget} "
        f"without EOS or a stop string (more than {ev.truncation_warn_frac:.0%}): their answers "
        "may be cut and scored wrong. Raise eval.max_new_tokens (or set it to auto), or end "
        "answers with a stop string (eval.stop); predictions.jsonl shows the cut generations "
        "(hit_budget).")
    return out


def check_truncation(results: dict[str, Any]) -> None:
    """eval.strict: raise `TruncationError` when a split's truncated share is over the
    threshold (call after results are written: the evidence stays on disk)."""
    t = results.get("truncation") or {}
    if t.get("strict") and t.get("warning"):
        raise TruncationError(f"{t['warning']} Failing because eval.strict=true (set "
                              "eval.strict=false to only warn).")
