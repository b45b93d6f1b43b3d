"""Summarise runs' results.json files as a markdown table (Pilot vs Pilot+Copilot, diagnostics;
with --matched, the matched-size Pilot of the same seed next to them).

    python tools/summarize_runs.py runs/seed0 runs/seed1 runs/seed2 \
        --matched runs/matched-seed0 runs/matched-seed1 runs/matched-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def row(run: Path) -> dict:
    r = json.loads((run / "results.json").read_text())
    tf = r["validation"]["teacher_forced"]
    h = r["history"]
    return {
        "run": run.name, "path": str(run), "seed": r["seed"], "pilot": r["pilot"]["accuracy"],
        "fused": r["pilot+copilot"]["accuracy"], "lambda": r["pilot+copilot"]["lambda"],
        "flips": r["pilot+copilot"]["flips"],
        "val_pilot": r["validation"]["pilot_accuracy"],
        "val_best": max(s["accuracy"] for s in r["validation"]["sweep"]),
        "ratio_val": tf["rmse_ratio"], "cos": tf["cosine"],
        "ratio_train_last": h[-1].get("rmse_ratio", float("nan")),
        "max_f": r["validation"]["generation"]["max_abs_f_median"],
        "margin": r["validation"]["generation"]["pilot_margin_median"],
        "fixes": tf["fixes"], "breaks": tf["breaks"], "seconds": r["seconds"]["total"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories holding results.json")
    ap.add_argument("--matched", nargs="*", type=Path, default=[],
                    help="matched-size baseline runs (configs/matched_size.yaml), paired by seed")
    args = ap.parse_args()
    rows = [row(p) for p in args.runs]
    if args.matched:
        print_comparison(rows, [json.loads((p / "results.json").read_text())
                                for p in args.matched])
    print("| run | seed | Pilot test acc | Pilot+Copilot test acc | λ (val) | test flips | "
          "val Pilot | val best λ | RMSE/zero (val) | RMSE/zero (train, last) | cos(f,ℓ) | "
          "median max|f| | median margin | wall s |")
    print("|" + "---|" * 14)
    for r in rows:
        print(f"| {r['run']} | {r['seed']} | {r['pilot']:.4f} | {r['fused']:.4f} | "
              f"{r['lambda']:g} | {r['flips']} | {r['val_pilot']:.4f} | {r['val_best']:.4f} | "
              f"{r['ratio_val']:.4f} | {r['ratio_train_last']:.4f} | {r['cos']:.4f} | "
              f"{r['max_f']:.4f} | {r['margin']:.4f} | {r['seconds']:.0f} |")
    if len(rows) > 1:
        p = statistics.mean(r["pilot"] for r in rows)
        f = statistics.mean(r["fused"] for r in rows)
        print(f"\nmean test accuracy over {len(rows)} runs: Pilot {p:.4f}, "
              f"Pilot+Copilot {f:.4f} (Δ {f - p:+.4f})")
    print("\nteacher-forced fixes / breaks per λ (validation):")
    for r in rows:
        print(f"- {r['run']}: " + ", ".join(f"λ={k}: +{r['fixes'][k]}/-{r['breaks'][k]}"
                                            for k in r["fixes"]))


def print_comparison(rows: list[dict], matched: list[dict]) -> None:
    """Pilot | Pilot+Copilot | matched-size Pilot, per seed and mean (the paper's Table 2)."""
    by_seed = {m["seed"]: m for m in matched}
    print("| seed | Pilot (params) | Pilot+Copilot (params, λ) | matched-size Pilot (params) |")
    print("|---|---|---|---|")
    trio = []
    for r in rows:
        m = by_seed.get(r["seed"])
        if m is None:
            continue
        res = json.loads((Path(r["path"]) / "results.json").read_text())
        n_p, n_c = res["params"]["pilot"], res["params"]["copilot"]
        print(f"| {r['seed']} | {r['pilot']:.4f} ({n_p / 1e6:.2f}M) | {r['fused']:.4f} "
              f"({(n_p + n_c) / 1e6:.2f}M, λ={r['lambda']:g}) | {m['pilot']['accuracy']:.4f} "
              f"({m['params']['pilot'] / 1e6:.2f}M) |")
        trio.append((r["pilot"], r["fused"], m["pilot"]["accuracy"]))
    if trio:
        means = [statistics.mean(t[i] for t in trio) for i in range(3)]
        sds = [statistics.stdev(t[i] for t in trio) if len(trio) > 1 else 0.0 for i in range(3)]
        print(f"| mean ± sd ({len(trio)} seeds) | {means[0]:.4f} ± {sds[0]:.4f} | "
              f"{means[1]:.4f} ± {sds[1]:.4f} | {means[2]:.4f} ± {sds[2]:.4f} |")
    print()


if __name__ == "__main__":
    main()
