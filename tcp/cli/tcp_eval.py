"""`tcp-eval`: evaluate a finished run (or a transferred Copilot) from the command line.

    tcp-eval runs/seed0                                  # the run's own data, λ sweep, test once
    tcp-eval runs/seed0 --pilot runs/seed1               # transfer: seed0's Copilot, seed1's Pilot
    tcp-eval runs/seed0 data.source=jsonl data.val_path=v.jsonl data.test_path=t.jsonl \\
        eval.answer_format=choice eval.strategy=beam --lambda 0.5

One process, no DeepSpeed: the Pilot is loaded from `<run>/final/pilot` (or `--pilot`), the
Copilot from `<run>/final/copilot.pt` with the run's resolved `config.yaml`; `key=value`
overrides apply to that config (data.*, eval.*). Writes `<run>/eval/<name>.json`, its plots and
`<run>/eval/<name>.predictions.jsonl` (tcp.evaluation.predictions).

`eval.max_new_tokens: auto` is sized from the validation answers and the training split's
(loaded and tokenized as the run did, so the budget matches the main job's); when the training
split cannot be loaded (a missing file, an HF dataset offline) from validation only, as printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tcp.config import ConfigError, RunConfig, from_dict, to_dict
from tcp.errors import RunError
from tcp.evaluation.report import format_table, summary_metrics
from tcp.runtime import quiet
from tcp.runtime.atomic import atomic_write_json
from tcp.runtime.console import LEVELS, logger, setup_logging


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
    p.add_argument("--log-level", choices=LEVELS, default=None,
                   help="tcp's console messages (the `tcp` logger): debug, info (default), "
                   "warning or error; $TCP_LOG_LEVEL sets it too. The result table is printed "
                   "at any level")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p.parse_intermixed_args(argv)


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of `tcp-eval`. Returns the exit code."""
    args = parse_args(argv)
    try:
        setup_logging(args.log_level)  # a bad $TCP_LOG_LEVEL is a config error
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # heavy (torch, transformers): imported once the arguments parse, so that --help is quick
    import torch

    from tcp.evaluation.decode_budget import TruncationError, check_truncation
    from tcp.evaluation.plots import save_plots
    from tcp.evaluation.run_loading import (
        TransferError,
        evaluate_run,
        load_eval_data,
        load_run,
        run_config,
    )

    quiet.install()  # the same expected third-party noise as the trainer's (tcp/runtime/quiet.py)
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
    atomic_write_json(out / f"{name}.json", results, indent=2)
    plots = save_plots(results, out / name)
    print(format_table(results))
    logger.info(f"[tcp-eval] Pilot {loaded.pilot_source}; Copilot {args.run}; "
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
    from tcp.runtime.tracking import Tracker  # heavy (mlflow): only with --mlflow

    data = to_dict(cfg)
    data["tracking"] = dict(data["tracking"], enabled=True,
                            run_name=f"{Path(cfg.output_dir).name}:{name}")
    tracker = Tracker(from_dict(RunConfig, data), rank=0)
    tracker.metrics(summary_metrics(results), step=0)
    for f in files:
        tracker.artifact(f, "plots" if f.suffix == ".png" else None)
    tracker.close("FINISHED")
    logger.info(f"[tcp-eval] logged to MLflow run {tracker.run_id}")


if __name__ == "__main__":
    sys.exit(eval_main())
