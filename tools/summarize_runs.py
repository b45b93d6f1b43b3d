"""Summarise runs: Pilot vs Pilot+Copilot per run and pooled over seeds, with a paired test.

    python tools/summarize_runs.py runs/seed0 runs/seed1 runs/seed2 \\
        --matched runs/matched-seed0 runs/matched-seed1 runs/matched-seed2
    python tools/summarize_runs.py 'runs/seed*' --json > summary.json
    python tools/summarize_runs.py runs/seed0/eval/eval.json     # a tcp-eval result

A run is a run directory (its results.json and predictions.jsonl beside it), a results JSON
file (`tcp-eval`'s <run>/eval/<name>.json, its <name>.predictions.jsonl beside it) or a glob of
either (quoted, or expanded by the shell).

Prints (markdown): the diagnostics table of each run; with --matched, Pilot | Pilot+Copilot |
matched-size Pilot per task and seed and mean ± sd; then the paired test table: per run
its test n, both accuracies, the chosen λ, Pilot+Copilot − Pilot in points with a 95% bootstrap
interval, the exact McNemar p and the discordant counts b (only the Pilot right) and c (only
Pilot+Copilot right), recomputed from predictions.jsonl; then the pooled lines: both accuracies
as mean ± sd over the runs (seeds), and one paired test over all runs' test examples
concatenated (per-example correct flags of each predictions.jsonl). Runs without
predictions.jsonl are listed with their results.json numbers and left out of the pooled test.

Pooling treats every (run, example) as its own example: runs of different seeds on the same
test split repeat the same questions, so the pooled interval is narrower than the evidence for
"another test set" warrants; it answers "across these runs, is the difference noise?".

Runs of several tasks (the built-in families, or user data) are also pooled **per task**: the
task of a run is its config.yaml's `data.source` (for jsonl/parquet/hf data: the training
file's path, or the dataset's name and config), and a last table gives, per task, the runs and
seeds, both accuracies as mean ± sd, and the paired test over that task's pooled examples.
`--matched` runs are paired with the runs of the same task (`data.source`) and seed.

--json prints {"runs": [...], "pooled": {...}, "tasks": {...}} instead: per run its path, task,
seed, n, accuracies, λ and "paired" (the format of results.json["paired"], tcp.evaluation.stats);
pooled the mean and sd of both accuracies and the pooled "paired", over all runs and per task.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcp.evaluation.predictions import read_paired_flags
from tcp.evaluation.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    format_paired,
    paired_comparison,
)


@dataclass
class Run:
    """One run's results.json (or tcp-eval result) and its per-example flags, when found."""

    name: str
    path: Path
    """The results JSON file."""
    task: str
    """`task_of` the run."""
    results: dict[str, Any]
    predictions: Path | None
    flags: tuple[list[bool], list[bool]] | None
    """(Pilot, Pilot+Copilot) correct flags per test example, from predictions.jsonl."""


def expand(args: list[str]) -> list[Path]:
    """The results files named by `args`: run directories, JSON files or globs of either."""
    out: list[Path] = []
    for a in args:
        paths = [Path(p) for p in sorted(glob.glob(a))] if glob.has_magic(a) else [Path(a)]
        if not paths:
            raise SystemExit(f"error: {a} matches nothing")
        for p in paths:
            f = p / "results.json" if p.is_dir() else p
            if not f.is_file():
                raise SystemExit(f"error: {p} holds no results.json (not a finished run?)")
            out.append(f)
    return out


def predictions_for(path: Path, results: dict[str, Any]) -> Path | None:
    """The predictions.jsonl written with `path`: beside it, else where results.json says."""
    beside = (path.parent / "predictions.jsonl" if path.name == "results.json"
              else path.with_name(f"{path.stem}.predictions.jsonl"))
    for cand in (beside, Path(results.get("predictions") or "")):
        if cand.name and cand.is_file():
            return cand
    return None


def run_name(path: Path) -> str:
    """The run directory's name; `<run>:<name>` for a tcp-eval result."""
    if path.name == "results.json":
        return path.parent.name
    return f"{path.parent.parent.name}:{path.stem}" if path.parent.name == "eval" else path.stem


def run_config(path: Path) -> dict[str, Any]:
    """The config.yaml of the run `path` belongs to (results.json beside it, a tcp-eval result
    in its eval/ folder); {} when there is none."""
    for cfg in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if cfg.is_file():
            import yaml

            return yaml.safe_load(cfg.read_text()) or {}
    return {}


def seed_of(path: Path, results: dict[str, Any]) -> Any:
    """results.json's seed, else (tcp-eval results) the seed in the run's config.yaml."""
    if "seed" in results:
        return results["seed"]
    return run_config(path).get("seed")


def task_of(path: Path) -> str:
    """The run's task: `data.source` for a built-in task, else the training data (file path, or
    dataset name and config); "unknown" without a config.yaml."""
    data = run_config(path).get("data") or {}
    source = data.get("source")
    if source is None:
        return "unknown"
    if source in ("jsonl", "parquet", "hf") and data.get("train_path"):
        config = f"[{data['hf_config']}]" if source == "hf" and data.get("hf_config") else ""
        return f"{source}:{data['train_path']}{config}"
    return str(source)


def load(path: Path) -> Run:
    """A run with its flags; warns (stderr) when predictions.jsonl disagrees with results."""
    res = json.loads(path.read_text())
    res.setdefault("seed", seed_of(path, res))
    preds = predictions_for(path, res)
    flags = read_paired_flags(preds, res["pilot+copilot"]["lambda"]) if preds else None
    run = Run(name=run_name(path), path=path, task=task_of(path), results=res, predictions=preds,
              flags=flags)
    if flags is not None:
        n = len(flags[0])
        got = (n, sum(flags[0]), sum(flags[1]))
        want = (res["test_size"], round(res["pilot"]["accuracy"] * res["test_size"]),
                round(res["pilot+copilot"]["accuracy"] * res["test_size"]))
        if got != want:
            print(f"warning: {preds} (n, Pilot correct, Pilot+Copilot correct) = {got} but "
                  f"{path} says {want}", file=sys.stderr)
    return run


def paired_of(run: Run, *, resamples: int, seed: int) -> dict[str, Any] | None:
    """The run's paired test, recomputed from its flags (else results.json's, if any)."""
    if run.flags is None:
        return run.results.get("paired")
    lam = run.results["pilot+copilot"]["lambda"]
    return paired_comparison(*run.flags, resamples=resamples, seed=seed).to_dict() | {
        "lambda": lam, "copilot_off": lam == 0}


def mean_sd(xs: list[float]) -> dict[str, float | None]:
    """Mean and sample sd (None for a single run)."""
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None}


def pool(runs: list[Run], per_run: list[dict[str, Any]], *, resamples: int,
         seed: int) -> dict[str, Any]:
    """Both accuracies' mean and sd over `runs`, and one paired test over their examples."""
    with_flags = [r for r in runs if r.flags is not None]
    pilot = [f for r in with_flags for f in r.flags[0]]  # type: ignore[index]
    fused = [f for r in with_flags for f in r.flags[1]]  # type: ignore[index]
    return {
        "runs": len(runs), "seeds": [r["seed"] for r in per_run],
        "pilot_accuracy": mean_sd([r["pilot_accuracy"] for r in per_run]),
        "copilot_accuracy": mean_sd([r["copilot_accuracy"] for r in per_run]),
        "paired_runs": [r.name for r in with_flags],
        "paired": (paired_comparison(pilot, fused, resamples=resamples, seed=seed).to_dict()
                   if with_flags else None),
    }


def summarize(runs: list[Run], *, resamples: int, seed: int) -> dict[str, Any]:
    """Per run, pooled and per-task numbers (the --json output)."""
    per_run = [{"run": r.name, "path": str(r.path), "task": r.task, "seed": r.results.get("seed"),
                "n": r.results["test_size"], "pilot_accuracy": r.results["pilot"]["accuracy"],
                "copilot_accuracy": r.results["pilot+copilot"]["accuracy"],
                "lambda": r.results["pilot+copilot"]["lambda"],
                "copilot_off": r.results["pilot+copilot"]["copilot_off"],
                "predictions": str(r.predictions) if r.predictions else None,
                "paired": paired_of(r, resamples=resamples, seed=seed)} for r in runs]
    tasks: dict[str, Any] = {}
    for task in dict.fromkeys(r.task for r in runs):  # first-seen order
        idx = [i for i, r in enumerate(runs) if r.task == task]
        tasks[task] = pool([runs[i] for i in idx], [per_run[i] for i in idx],
                           resamples=resamples, seed=seed)
    return {"runs": per_run, "pooled": pool(runs, per_run, resamples=resamples, seed=seed),
            "tasks": tasks}


def _runs(k: int) -> str:
    return f"{k} run" + ("" if k == 1 else "s")


def _pm(ms: dict[str, float | None]) -> str:
    sd = ms["sd"]
    return f"{ms['mean']:.4f} ± " + ("n/a" if sd is None else f"{sd:.4f}")


def print_paired(summary: dict[str, Any]) -> None:
    """The paired test table per run and the pooled lines (markdown)."""
    print("\nPilot vs Pilot+Copilot on test, paired per example (Δ = Pilot+Copilot − Pilot; "
          "b: only the Pilot right, c: only Pilot+Copilot right):\n")
    print("| run | seed | n | Pilot | Pilot+Copilot | λ | Δ points [95% CI] | McNemar p | b | c |")
    print("|" + "---|" * 10)
    for r in summary["runs"]:
        p = r["paired"]
        cells = (["n/a (no predictions.jsonl)", "", "", ""] if p is None else
                 [f"{100 * p['diff']:+.1f} [{100 * p['diff_ci95'][0]:+.1f}, "
                  f"{100 * p['diff_ci95'][1]:+.1f}]", f"{p['mcnemar_p']:.3g}", p["b"], p["c"]])
        lam = f"{r['lambda']:g}" + (" (Copilot off)" if r["copilot_off"] else "")
        print(f"| {r['run']} | {r['seed']} | {r['n']} | {r['pilot_accuracy']:.4f} | "
              f"{r['copilot_accuracy']:.4f} | {lam} | " + " | ".join(map(str, cells)) + " |")
    pool = summary["pooled"]
    print(f"\npooled over {_runs(pool['runs'])} (seeds {', '.join(map(str, pool['seeds']))}), "
          f"mean ± sd over runs: Pilot {_pm(pool['pilot_accuracy'])}, "
          f"Pilot+Copilot {_pm(pool['copilot_accuracy'])}")
    if pool["paired"] is None:
        print("paired test over pooled examples: n/a (no run has predictions.jsonl)")
        return
    left_out = pool["runs"] - len(pool["paired_runs"])
    print(f"paired test over the {pool['paired']['n']} pooled test examples "
          f"({_runs(len(pool['paired_runs']))}" + (f"; {_runs(left_out)} without "
                                                    "predictions.jsonl left out" if left_out
                                                    else "")
          + f"): {format_paired(pool['paired'])}")


def print_tasks(summary: dict[str, Any]) -> None:
    """Per task: runs, seeds, both accuracies (mean ± sd over runs) and the pooled paired test."""
    print("\nPer task, pooled over its runs (Δ = Pilot+Copilot − Pilot, paired over the pooled "
          "test examples):\n")
    print("| task | runs (seeds) | Pilot | Pilot+Copilot | relative | Δ points [95% CI] | "
          "McNemar p | b | c | n |")
    print("|" + "---|" * 10)
    for task, t in summary["tasks"].items():
        p = t["paired"]
        pilot, fused = t["pilot_accuracy"]["mean"], t["copilot_accuracy"]["mean"]
        rel = f"{100 * (fused - pilot) / pilot:+.1f}%" if pilot else "n/a"
        cells = (["n/a (no predictions.jsonl)", "", "", "", ""] if p is None else
                 [f"{100 * p['diff']:+.1f} [{100 * p['diff_ci95'][0]:+.1f}, "
                  f"{100 * p['diff_ci95'][1]:+.1f}]", f"{p['mcnemar_p']:.3g}", p["b"], p["c"],
                  p["n"]])
        print(f"| {task} | {t['runs']} ({', '.join(map(str, t['seeds']))}) | "
              f"{_pm(t['pilot_accuracy'])} | {_pm(t['copilot_accuracy'])} | {rel} | "
              + " | ".join(map(str, cells)) + " |")


def row(run: Run) -> dict[str, Any]:
    """The diagnostics table's row (fields a tcp-eval result lacks print as nan)."""
    r = run.results
    nan = float("nan")
    tf = r["validation"]["teacher_forced"]
    h = r.get("history") or [{}]
    return {
        "run": run.name, "seed": r.get("seed"), "pilot": r["pilot"]["accuracy"],
        "fused": r["pilot+copilot"]["accuracy"], "lambda": r["pilot+copilot"]["lambda"],
        "flips": r["pilot+copilot"]["flips"],
        "val_pilot": r["validation"]["pilot_accuracy"],
        "val_best": max((s["accuracy"] for s in r["validation"]["sweep"]), default=nan),
        "ratio_val": tf["rmse_ratio"], "cos": tf["cosine"],
        "ratio_train_last": h[-1].get("rmse_ratio", nan),
        "max_f": r["validation"]["generation"]["max_abs_f_median"],
        "margin": r["validation"]["generation"]["pilot_margin_median"],
        "fixes": tf["fixes"], "breaks": tf["breaks"],
        "seconds": r.get("seconds", {}).get("total", nan),
    }


def print_diagnostics(rows: list[dict[str, Any]]) -> None:
    """Per run: both accuracies, λ and the docs/method.md §7 diagnostics (markdown)."""
    print("| run | seed | Pilot test acc | Pilot+Copilot test acc | λ (val) | test flips | "
          "val Pilot | val best λ | RMSE/zero (val) | RMSE/zero (train, last) | cos(f,ℓ) | "
          "median max|f| | median margin | wall s |")
    print("|" + "---|" * 14)
    for r in rows:
        print(f"| {r['run']} | {r['seed']} | {r['pilot']:.4f} | {r['fused']:.4f} | "
              f"{r['lambda']:g} | {r['flips']} | {r['val_pilot']:.4f} | {r['val_best']:.4f} | "
              f"{r['ratio_val']:.4f} | {r['ratio_train_last']:.4f} | {r['cos']:.4f} | "
              f"{r['max_f']:.4f} | {r['margin']:.4f} | {r['seconds']:.0f} |")


def print_comparison(runs: list[Run], matched: list[Run]) -> None:
    """Pilot | Pilot+Copilot | matched-size Pilot, per seed and mean (the paper's Table 2): a
    run is paired with the matched-size run of its task and seed; runs without one are left
    out."""
    by_key = {(m.task, m.results.get("seed")): m.results for m in matched}
    print("| task | seed | Pilot (params) | Pilot+Copilot (params, λ) | "
          "matched-size Pilot (params) |")
    print("|---|---|---|---|---|")
    trio = []
    for run in runs:
        res = run.results
        m = by_key.get((run.task, res.get("seed")))
        if m is None or "params" not in res:
            continue
        pilot, fused = res["pilot"]["accuracy"], res["pilot+copilot"]["accuracy"]
        n_p, n_c = res["params"]["pilot"], res["params"]["copilot"]
        print(f"| {run.task} | {res['seed']} | {pilot:.4f} ({n_p / 1e6:.2f}M) | {fused:.4f} "
              f"({(n_p + n_c) / 1e6:.2f}M, λ={res['pilot+copilot']['lambda']:g}) | "
              f"{m['pilot']['accuracy']:.4f} ({m['params']['pilot'] / 1e6:.2f}M) |")
        trio.append((pilot, fused, m["pilot"]["accuracy"]))
    if trio:
        means = [statistics.mean(t[i] for t in trio) for i in range(3)]
        sds = [statistics.stdev(t[i] for t in trio) if len(trio) > 1 else 0.0 for i in range(3)]
        print(f"| | mean ± sd ({len(trio)} runs) | {means[0]:.4f} ± {sds[0]:.4f} | "
              f"{means[1]:.4f} ± {sds[1]:.4f} | {means[2]:.4f} ± {sds[2]:.4f} |")
    print()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories, results JSON files, or globs")
    ap.add_argument("--matched", nargs="*", default=[],
                    help="matched-size baseline runs (configs/matched_size.yaml), paired by "
                         "task and seed")
    ap.add_argument("--json", action="store_true",
                    help="print the per-run and pooled numbers as JSON instead of markdown")
    ap.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES,
                    help="bootstrap resamples (default %(default)s)")
    ap.add_argument("--bootstrap-seed", type=int, default=BOOTSTRAP_SEED,
                    help="bootstrap seed (default %(default)s: the one results.json uses)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [load(p) for p in expand(args.runs)]
    summary = summarize(runs, resamples=args.resamples, seed=args.bootstrap_seed)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    if args.matched:
        print_comparison(runs, [load(p) for p in expand(args.matched)])
    rows = [row(r) for r in runs]
    print_diagnostics(rows)
    print_paired(summary)
    print_tasks(summary)
    print("\nteacher-forced fixes / breaks per λ (validation):")
    for r in rows:
        print(f"- {r['run']}: " + ", ".join(f"λ={k}: +{r['fixes'][k]}/-{r['breaks'][k]}"
                                            for k in r["fixes"]))


if __name__ == "__main__":
    main()
