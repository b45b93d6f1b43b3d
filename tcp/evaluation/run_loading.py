"""Loading a finished run for evaluation: its resolved config, tokenizer, final Pilot (or another
run's, for transfer) and Copilot, and its evaluation data; then the protocol on them. Used by
`tcp-eval` and the offline job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoTokenizer

from tcp.config import ConfigError, RunConfig, apply_overrides, from_dict
from tcp.data.prepare import context_of, prepare_eval_data
from tcp.data.tokenizer import token_id_differences
from tcp.evaluation.decode_budget import budget_for_pilot
from tcp.evaluation.protocol import evaluate_and_report
from tcp.models.copilot import Copilot
from tcp.models.lm_head import use_fused_head
from tcp.models.pilot import PilotTap, load_pretrained
from tcp.runtime.console import logger


class TransferError(ValueError):
    """The Copilot cannot be used with this Pilot; the message says why and what would fit."""


@dataclass
class LoadedRun:
    """A run's config, tokenizer and final models, ready to evaluate."""

    cfg: RunConfig
    tokenizer: Any
    pilot: torch.nn.Module
    copilot: torch.nn.Module
    pilot_source: str


def run_config(run: Path, overrides: list[str]) -> RunConfig:
    """The run's resolved config with `overrides` applied (errors name the key)."""
    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run} is not a tcp run directory (no config.yaml); pass the "
                          "output_dir of a finished run")
    data = yaml.safe_load(path.read_text())
    data["output_dir"] = str(run)
    data["resume"] = None
    return from_dict(RunConfig, apply_overrides(data, overrides))


def _pilot_dir(src: Path) -> Path:
    """A run directory's final Pilot, or `src` itself when it is an HF model folder."""
    if (src / "final" / "pilot" / "config.json").is_file():
        return src / "final" / "pilot"
    if (src / "config.json").is_file():
        return src
    raise FileNotFoundError(f"{src}: neither a finished run (no final/pilot) nor an HF model "
                            "folder (no config.json)")


def _tokenizer_dir(src: Path) -> Path | None:
    for cand in (src / "tokenizer", src.parent.parent / "tokenizer", src):
        if (cand / "tokenizer_config.json").is_file():
            return cand
    return None


def check_transfer(*, copilot_vocab: int, copilot_d_pilot: int, pilot_config: Any,
                   copilot_tokenizer: Any, pilot_tokenizer: Any | None) -> None:
    """Refuse a Pilot the Copilot cannot read: another vocabulary (size or token ids) or another
    hidden width (the Copilot's memory projection expects d_P)."""
    problems = []
    v = int(pilot_config.vocab_size)
    if v != copilot_vocab:
        problems.append(f"vocabulary size {v} != the Copilot's {copilot_vocab} (its error "
                        "projection and output head are per token)")
    d = int(pilot_config.hidden_size)
    if d != copilot_d_pilot:
        problems.append(f"Pilot hidden size {d} != the {copilot_d_pilot} the Copilot's "
                        "cross-attention memory was trained on")
    if pilot_tokenizer is not None:
        diff = token_id_differences(copilot_tokenizer, pilot_tokenizer)
        if diff:
            problems.append(f"the tokenizers differ in {diff} token ids (the same token must "
                            "have the same id for the Copilot's per-token errors to mean anything)")
    if problems:
        raise TransferError("this Copilot cannot be used with this Pilot: " + "; ".join(problems)
                            + ". Transfer needs a Pilot of the same family and tokenizer "
                            "(e.g. another fine-tune of the same base model).")


def load_run(run: Path, cfg: RunConfig, *, pilot_from: Path | None,
             device: torch.device) -> LoadedRun:
    """The run's tokenizer and Copilot, and its own Pilot or the one at `pilot_from`."""
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    cop_path = run / "final" / "copilot.pt"
    if not cop_path.is_file():
        raise FileNotFoundError(f"{cop_path} missing: the run did not finish (resume it with "
                                "resume=auto) or was not a tcp run")
    state = torch.load(cop_path, map_location="cpu", weights_only=True)
    vocab, d_pilot = state["err_proj.weight"].shape[0], state["mem_proj.proj.weight"].shape[1]
    src = _pilot_dir(pilot_from or run)
    pilot = load_pretrained(str(src))
    if pilot_from is not None:
        tdir = _tokenizer_dir(pilot_from)
        check_transfer(copilot_vocab=vocab, copilot_d_pilot=d_pilot, pilot_config=pilot.config,
                       copilot_tokenizer=tokenizer,
                       pilot_tokenizer=AutoTokenizer.from_pretrained(tdir) if tdir else None)
    encdec = any(".cross_attn." in k for k in state)  # the variant the run trained
    copilot = Copilot(cfg.copilot, vocab_size=vocab, pilot_hidden=d_pilot, encoder_decoder=encdec)
    copilot.load_state_dict(state)
    return LoadedRun(cfg=cfg, tokenizer=tokenizer, pilot=pilot.to(device).eval(),
                     copilot=copilot.to(device).eval(), pilot_source=str(src))


def load_eval_data(run: Path, cfg: RunConfig, *, pilot_from: Path | None,
                   limit: int | None) -> Any:
    """The evaluation's data (`tcp.data.prepare.prepare_eval_data`), before any model loads: a
    bad file is a DataError (exit 2); data.max_length=auto is capped by the Pilot's context."""
    if not (run / "tokenizer").is_dir():
        raise FileNotFoundError(f"{run / 'tokenizer'} missing: not a tcp run directory")
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    context: tuple[int | None, str] = (None, "no context limit known")
    if cfg.data.max_length == "auto":
        src = _pilot_dir(pilot_from or run)
        context = context_of(AutoConfig.from_pretrained(src), tokenizer, name=str(src))
    return prepare_eval_data(cfg, tokenizer, limit=limit, context=context)


def evaluate_run(loaded: LoadedRun, data: Any, *, lam: float | None, device: torch.device,
                 predictions_path: Path | None = None, rank: int = 0,
                 world: int = 1) -> dict[str, Any]:
    """The λ sweep on validation (or `lam`), test once, diagnostics and a rectification trace;
    predictions.jsonl at `predictions_path` when given. `data`: `load_eval_data`'s. With
    `world` > 1 (collective; the offline job,
    tcp.training.offline_job) each rank scores its shard of every
    split with its own whole copy of both models."""
    cfg = loaded.cfg
    val, test = data.splits["validation"], data.splits["test"]
    val_samples = data.samples["validation"]
    for line in data.notes if rank == 0 else []:
        logger.info(line)
    sized = {k: data.samples[k] for k in ("train", "validation") if k in data.samples}
    # The run's training answers decide eval.answer_format=auto with validation's (as the run).
    train_golds = [r["answer"] for r in data.splits["train"]] if "train" in data.splits else None
    budget = budget_for_pilot(cfg.eval, sized, loaded.tokenizer, pilot=loaded.pilot,
                              max_length=cfg.data.max_length)
    if rank == 0:
        logger.info(f"[tcp-eval] {budget.describe()}")
    # Teacher-forced diagnostics then compute logits at target rows only (no (B, T, V)).
    use_fused_head(loaded.pilot, required=False)
    tap = PilotTap(loaded.pilot, impl=cfg.kernels.impl)
    try:
        return evaluate_and_report(cfg, pilot=loaded.pilot, copilot=loaded.copilot, tap=tap,
                                   tokenizer=loaded.tokenizer, val_records=val,
                                   test_records=test, val_samples=val_samples, rank=rank,
                                   world=world,
                                   device=device, lam=lam, budget=budget,
                                   predictions_path=predictions_path, train_golds=train_golds)
    finally:
        tap.remove()
