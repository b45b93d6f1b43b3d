"""`tcp-eval`: evaluate a finished run (or a transferred Copilot) from the command line.

    tcp-eval runs/seed0                                  # the run's own data, λ sweep, test once
    tcp-eval runs/seed0 --pilot runs/seed1               # transfer: seed0's Copilot, seed1's Pilot
    tcp-eval runs/seed0 data.source=jsonl data.val_path=v.jsonl data.test_path=t.jsonl \\
        eval.answer_format=choice eval.strategy=beam --lambda 0.5

One process, no DeepSpeed: the Pilot is loaded from `<run>/final/pilot` (or `--pilot`), the
Copilot from `<run>/final/copilot.pt` with the run's resolved `config.yaml`; `key=value`
overrides apply to that config (data.*, eval.*). Writes `<run>/eval/<name>.json`, its plots and
`<run>/eval/<name>.predictions.jsonl` (tcp.predictions).

`eval.max_new_tokens: auto` is sized from the validation answers and the training split's
(loaded and tokenized as the run did, so the budget matches the main job's); when the training
split cannot be loaded (a missing file, an HF dataset offline) from validation only, as printed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tcp.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict


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
    import yaml

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
        from tcp.data.tokenizer import token_id_differences

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
    from transformers import AutoTokenizer

    from tcp.models.copilot import Copilot
    from tcp.models.pilot import load_pretrained

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
    from transformers import AutoConfig, AutoTokenizer

    from tcp.data.prepare import context_of, prepare_eval_data

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
    `world` > 1 (collective; the offline job, tcp.offline) each rank scores its shard of every
    split with its own whole copy of both models."""
    from tcp.budget import budget_for_pilot
    from tcp.models.pilot import PilotTap, use_fused_head
    from tcp.train import evaluate_and_report

    cfg = loaded.cfg
    val, test = data.splits["validation"], data.splits["test"]
    val_samples = data.samples["validation"]
    for line in data.notes if rank == 0 else []:
        print(line)
    sized = {k: data.samples[k] for k in ("train", "validation") if k in data.samples}
    # The run's training answers decide eval.answer_format=auto with validation's (as the run).
    train_golds = [r["answer"] for r in data.splits["train"]] if "train" in data.splits else None
    budget = budget_for_pilot(cfg.eval, sized, loaded.tokenizer, pilot=loaded.pilot,
                              max_length=cfg.data.max_length)
    if rank == 0:
        print(f"[tcp-eval] {budget.describe()}")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tcp-eval",
        description="Evaluate a finished tcp run: Pilot vs Pilot+Copilot with λ chosen on "
        "validation and the test split scored once; or a Copilot transferred to another "
        "run's Pilot (--pilot).",
        epilog="key=value overrides apply to the run's config.yaml, e.g. "
        "data.source=jsonl data.val_path=val.jsonl data.test_path=test.jsonl "
        "eval.answer_format=yesno eval.strategy=beam eval.num_beams=4. Exit codes: 0 done, "
        "2 bad config or data, missing run, incompatible transfer, or (eval.strict=true) more "
        "generations cut at eval.max_new_tokens than eval.truncation_warn_frac (results are "
        "still written).")
    p.add_argument("run", type=Path, help="run directory (its output_dir) whose Copilot is used")
    p.add_argument("--pilot", type=Path, default=None,
                   help="use the Pilot of this run directory (or HF model folder) instead of "
                   "the run's own: Copilot transfer (default for a Copilot trained offline: "
                   "its source run's Pilot, offline.source)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="score at this λ (no sweep; 0: the Pilot alone); default: sweep "
                   "eval.lambdas on validation, λ=0 (Copilot off) included")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N records of each split (quick checks)")
    p.add_argument("--name", default=None,
                   help="output name under <run>/eval/ (default: 'eval', or "
                   "'transfer-<pilot run>')")
    p.add_argument("--mlflow", action="store_true",
                   help="log the metrics and plots as a new MLflow run (the run's tracking URI)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of `tcp-eval`. Returns the exit code."""
    from tcp.budget import TruncationError, check_truncation
    from tcp.errors import RunError
    from tcp.eval_report import format_table
    from tcp.plots import save_plots
    from tcp.train import write_json

    args = parse_args(argv)
    from tcp import quiet

    quiet.install()  # the same expected third-party noise as the trainer's (tcp/quiet.py)
    if args.lam is not None and args.lam < 0:
        print(f"error: --lambda must be >= 0 (got {args.lam}); 0 scores the Pilot alone",
              file=sys.stderr)
        return 2
    try:
        cfg = run_config(args.run, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A Copilot trained offline (tcp-train --offline-from) has no Pilot of its own: its
    # source run's is the default.
    pilot_from = args.pilot or (Path(cfg.offline.source) if cfg.offline.source else None)
    try:
        data = load_eval_data(args.run, cfg, pilot_from=pilot_from, limit=args.limit)
        cfg = data.cfg  # data.max_length resolved
        loaded = load_run(args.run, cfg, pilot_from=pilot_from, device=device)
    except RunError as e:  # bad data: one line, before any model loads
        print(f"{e.kind} error: {e}", file=sys.stderr)
        return 2
    except (TransferError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    name = args.name or ("eval" if args.pilot is None else f"transfer-{args.pilot.name}")
    out = args.run / "eval"
    out.mkdir(exist_ok=True)
    results = evaluate_run(loaded, data, lam=args.lam, device=device,
                           predictions_path=out / f"{name}.predictions.jsonl")
    results.update(copilot_run=str(args.run), pilot=results["pilot"] | {
        "source": loaded.pilot_source}, config_overrides=args.overrides)
    write_json(out / f"{name}.json", results)
    plots = save_plots(results, out / name)
    print(format_table(results))
    print(f"[tcp-eval] Pilot {loaded.pilot_source}; Copilot {args.run}; "
          f"results {out / f'{name}.json'}; plots {', '.join(str(p) for p in plots)}")
    if args.mlflow:
        _log_mlflow(cfg, name, results, [out / f"{name}.json", *plots])
    try:
        check_truncation(results)
    except TruncationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _log_mlflow(cfg: RunConfig, name: str, results: dict[str, Any], files: list[Path]) -> None:
    from tcp.eval_report import summary_metrics
    from tcp.tracking import Tracker

    data = to_dict(cfg)
    data["tracking"] = dict(data["tracking"], enabled=True,
                            run_name=f"{Path(cfg.output_dir).name}:{name}")
    tracker = Tracker(from_dict(RunConfig, data), rank=0)
    tracker.metrics(summary_metrics(results), step=0)
    for f in files:
        tracker.artifact(f, "plots" if f.suffix == ".png" else None)
    tracker.close("FINISHED")
    print(f"[tcp-eval] logged to MLflow run {tracker.run_id}")


if __name__ == "__main__":
    sys.exit(eval_main())
