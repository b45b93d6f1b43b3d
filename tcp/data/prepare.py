"""A run's data, ready to train on: load every split, size `data.max_length: auto`, tokenise,
and stop (DataError, exit 2) when too much would be dropped or is unknown to the tokenizer.

Called by `tcp.training.joint_job` before any model is built; the returned config has
`data.max_length` as a number, so everything after (the budget, the base cache, config.yaml, a
resume) sees one value.

The `auto` rule: the 99.5th percentile (nearest rank) of the training split's sample lengths
(`[BOS] prompt answer [EOS]` in tokens), rounded up to a multiple of 8, capped by the Pilot's
context (`model_context`). Deterministic in the data and tokenizer, so a resume resolves to the
checkpoint's value. Up to 0.5% of the training split may then be over-long by design, inside the
default `data.max_drop_frac` (1%).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tcp.config import DataConfig, RunConfig
from tcp.data.collate import TokenizedSample, TokenizeReport, encode_records, tokenize_records
from tcp.data.loaders import DataError, Record, load_split_located

SPLITS = ("train", "validation", "test")
AUTO_PERCENTILE = 99.5
AUTO_MULTIPLE = 8
PLAN_FALLBACK = 1024
"""--dry-run's stand-in for 'auto' when nothing states the Pilot's context."""
NO_LIMIT = 2**62
SANE_CONTEXT = 10_000_000
"""A tokenizer's model_max_length above this is HF's "unset" placeholder (1e30), not a limit."""


@dataclass
class LengthChoice:
    """How `data.max_length: auto` was resolved (printed, and in results.json)."""

    value: int
    percentile_length: int
    """The 99.5th-percentile sample length of the training split, in tokens."""
    cap: int | None
    cap_source: str
    samples: int
    over: int
    """Training samples longer than `value`."""

    def describe(self) -> str:
        """The one `[tcp]` line of the choice."""
        capped = (f", capped at {self.cap} ({self.cap_source})"
                  if self.cap is not None and self.value == self.cap else "")
        return (f"data.max_length=auto -> {self.value}: the {AUTO_PERCENTILE:g}th percentile "
                f"of {self.samples} training samples is {self.percentile_length} tokens, rounded "
                f"up to a multiple of {AUTO_MULTIPLE}{capped}; {self.over} training samples are "
                "longer")


@dataclass
class PreparedData:
    """Every split's records, the tokenized train/validation samples and what was counted."""

    cfg: RunConfig
    """The run config with `data.max_length` resolved to a number."""
    splits: dict[str, list[Record]]
    samples: dict[str, list[TokenizedSample]]
    reports: dict[str, TokenizeReport]
    length: LengthChoice | None = None
    notes: list[str] = field(default_factory=list)
    """`[tcp]` lines to print once (rank 0)."""

    def results(self) -> dict[str, Any]:
        """The `data` section of results.json: each split's counts, and the max_length choice."""
        out: dict[str, Any] = {s: vars(r) | {"skipped_ids": r.skipped_ids[:20]}
                               for s, r in self.reports.items()}
        out["max_length"] = {"value": self.cfg.data.max_length,
                             "auto": dataclasses.asdict(self.length) if self.length else None}
        return out

    def metrics(self) -> dict[str, float]:
        """The per-split counts as flat metrics (MLflow)."""
        keys = ("skipped_overlength", "truncated", "unk_tokens")
        return {f"data/{s}/{k}": float(getattr(r, k)) for s, r in self.reports.items()
                for k in keys if getattr(r, k) is not None and (s != "test" or k == "unk_tokens")}


def model_context(cfg: RunConfig, tokenizer: Any = None) -> tuple[int | None, str]:
    """(the longest sequence the Pilot takes, where that number comes from): the built-in
    arch's `max_position_embeddings` for the embedded default; for a pretrained Pilot its
    config.json's `max_position_embeddings`/`n_positions`, else the tokenizer's
    `model_max_length` if sane; (None, ...) when nothing says."""
    if cfg.model.name_or_path is None:
        return cfg.model.arch.max_position_embeddings, "model.arch.max_position_embeddings"
    from transformers import AutoConfig  # heavy: transformers loads only where a model is built

    try:
        conf = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):  # offline and not cached: the model load says so later
        conf = None
    return context_of(conf, tokenizer, name=cfg.model.name_or_path)


def context_of(conf: Any, tokenizer: Any = None, *, name: str = "the Pilot") -> tuple[
        int | None, str]:
    """`model_context` from an HF config object (and tokenizer)."""
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return v, f"{name}'s {key}"
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v <= SANE_CONTEXT:
        return v, f"{name}'s tokenizer model_max_length"
    return None, "no context limit known"


def planned_max_length(cfg: RunConfig, conf: Any) -> tuple[RunConfig, str]:
    """For --dry-run, which loads no data: `cfg` with 'auto' planned at the Pilot's context
    (`conf`: its HF config), an upper bound of what the run will pick; and a remark saying so."""
    ctx, src = (model_context(cfg) if cfg.model.name_or_path is None
                else context_of(conf, name=cfg.model.name_or_path))
    value = ctx or PLAN_FALLBACK
    why = f"the Pilot's context ({src})" if ctx else f"{PLAN_FALLBACK} tokens ({src})"
    remark = (f"data.max_length=auto: planned at {why}, an upper bound; the run sizes it from "
              f"the training data ({AUTO_PERCENTILE:g}th percentile of lengths), or set "
              "data.max_length to plan for a number")
    data = dataclasses.replace(cfg.data, max_length=value)
    return dataclasses.replace(cfg, data=data), remark


def auto_max_length(lengths: list[int], cap: int | None) -> tuple[int, int]:
    """(max_length, the percentile length) for `data.max_length: auto` (module docstring)."""
    if not lengths:
        raise DataError("data.max_length=auto: the training split is empty; there is nothing to "
                        "size it from")
    ordered = sorted(lengths)
    pct = ordered[max(0, math.ceil(AUTO_PERCENTILE / 100 * len(ordered)) - 1)]
    value = max(AUTO_MULTIPLE, -(-pct // AUTO_MULTIPLE) * AUTO_MULTIPLE)
    if cap is not None:
        value = min(value, cap)
    return value, pct


def prepare_data(cfg: RunConfig, tokenizer: Any, *,
                 context: tuple[int | None, str] = (None, "no context limit known")
                 ) -> PreparedData:
    """Load, size, tokenise and check every split (module docstring). `context`: the Pilot's
    (`model_context`), the cap of 'auto'. DataError on any problem, naming where and the fix."""
    located = {s: load_split_located(cfg.data, s, seed=cfg.seed) for s in SPLITS}
    return _prepare(cfg, tokenizer, located, context=context, checked=SPLITS, tag="[tcp]")


def prepare_eval_data(cfg: RunConfig, tokenizer: Any, *, limit: int | None,
                      context: tuple[int | None, str]) -> PreparedData:
    """tcp-eval's data, checked as a run checks it: validation and test (their first `limit`
    records), and the training split when 'auto' needs it (data.max_length: required;
    eval.max_new_tokens and eval.answer_format, which the run sized and decided on its training
    split too: left out with a note when it cannot be loaded)."""
    located = {}
    for s in ("validation", "test"):
        recs, where = load_split_located(cfg.data, s, seed=cfg.seed)
        located[s] = (recs[:limit], where[:limit])
    notes = []
    ev = cfg.eval
    if "auto" in (cfg.data.max_length, ev.max_new_tokens, ev.answer_format):
        try:  # the run's training answers too, so the budget is the main job's
            located["train"] = load_split_located(cfg.data, "train", seed=cfg.seed)
        except DataError as e:
            if cfg.data.max_length == "auto":
                raise
            notes.append(f"[tcp-eval] the training split could not be loaded ({e}); "
                         "eval.max_new_tokens/answer_format=auto use validation answers only")
    out = _prepare(cfg, tokenizer, located, context=context, checked=("validation", "test"),
                   tag="[tcp-eval]")
    out.notes[:0] = notes
    return out


def _prepare(cfg: RunConfig, tokenizer: Any, located: dict[str, tuple[list[Record], list[str]]],
             *, context: tuple[int | None, str], checked: tuple[str, ...],
             tag: str) -> PreparedData:
    """Size 'auto' from located['train'], tokenise every split, check the `checked` ones."""
    splits = {s: recs for s, (recs, _) in located.items()}
    try:
        encoded = {s: encode_records(recs, tokenizer) for s, recs in splits.items()}
    except ValueError as e:  # a tokenizer without EOS
        raise DataError(f"{e} (data.tokenizer)") from None
    length = None
    if cfg.data.max_length == "auto":
        lengths = [len(p) + len(a) for p, a in encoded["train"]]
        value, pct = auto_max_length(lengths, context[0])
        length = LengthChoice(value=value, percentile_length=pct, cap=context[0],
                              cap_source=context[1], samples=len(lengths),
                              over=sum(n > value for n in lengths))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=value))
    data = cfg.data
    assert isinstance(data.max_length, int)
    samples, reports = {}, {}
    for s in splits:  # test is decoded from its prompts, never cut: counted, not fitted
        limit = data.max_length if s != "test" else NO_LIMIT
        samples[s], reports[s] = tokenize_records(splits[s], tokenizer, max_length=limit,
                                                  overlength=data.overlength, encoded=encoded[s])
    notes = [f"{tag} {length.describe()}"] if length else []
    for s in ("train", "validation"):
        r = reports.get(s)
        if r is not None and (r.skipped_overlength or r.truncated):
            notes.append(f"{tag} {s}: {r.skipped_overlength} over-long samples skipped, "
                         f"{r.truncated} truncated (data.max_length={data.max_length})")
    for s in checked:
        check_split(s, reports[s], data, where=located[s][1], context=context,
                    drops=s != "test")
    samples.pop("test", None)  # decoded from its records; tokenized above only to be counted
    return PreparedData(cfg=cfg, splits=splits, samples=samples, reports=reports,
                        length=length, notes=notes)


def check_split(split: str, r: TokenizeReport, data: DataConfig, *, where: list[str],
                context: tuple[int | None, str], drops: bool = True) -> None:
    """DataError when `split` loses more than data.max_drop_frac of its samples to max_length
    (`drops`: the test split is decoded from its prompts, nothing is dropped) or more than
    data.max_unk_frac of its tokens are unknown. The message says how many, where and which
    keys to change."""
    cut = r.skipped_overlength + r.truncated
    if drops and r.total and (cut / r.total > data.max_drop_frac or r.kept == 0):
        how = "skipped" if data.overlength == "skip" else "truncated or skipped"
        cap = context[0]
        raise_it = (f"raise data.max_length (the Pilot's context is {cap} tokens)" if cap
                    else "raise data.max_length")
        raise DataError(
            f"{split}: {cut} of {r.total} samples ({cut / r.total:.1%}) are longer than "
            f"data.max_length={data.max_length} tokens and would be {how} (longest: {r.longest} "
            f"tokens, {where[r.longest_id]}), more than data.max_drop_frac={data.max_drop_frac:g}"
            f"; {raise_it}, shorten those samples, or raise data.max_drop_frac to accept it")
    if r.unk_tokens and r.unk_tokens / max(r.tokens, 1) > data.max_unk_frac:
        text = ", ".join(repr(t) for t in r.unk_text) or "see the samples"
        raise DataError(
            f"{split}: {r.unk_tokens} of {r.tokens} tokens ({r.unk_tokens / r.tokens:.2%}) in "
            f"{r.unk_samples} samples are the tokenizer's unknown token (first: "
            f"{where[r.unk_ids[0]]}; text it cannot represent: {text}), more than "
            f"data.max_unk_frac={data.max_unk_frac:g}; clean those characters from the data, "
            "use a tokenizer that covers them (data.tokenizer), or raise data.max_unk_frac to "
            "accept it")
