"""Summarise runs' results.json files as a markdown table (Pilot vs Pilot+Copilot, diagnostics).

    python tools/summarize_runs.py runs/seed0 runs/seed1 runs/seed2
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
        "run": run.name, "seed": r["seed"], "pilot": r["pilot"]["accuracy"],
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
    rows = [row(p) for p in ap.parse_args().runs]
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


if __name__ == "__main__":
    main()
