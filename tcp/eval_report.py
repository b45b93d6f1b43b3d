"""How evaluation results are shown: the printed table and the flat metrics MLflow records.

Both read the results dict of `tcp.train.evaluate_and_report` (results.json), for the main job
and `tcp-eval` alike: the decoding budget used, the share of generations cut at it per split
(with the one warning over `eval.truncation_warn_frac`), and whether the Copilot was switched
off because no lambda > 0 beat the Pilot on validation.
"""

from __future__ import annotations

from typing import Any


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers logged as MLflow metrics (accuracies, lambda, budget, truncation)."""
    v, pc, t = results["validation"], results["pilot+copilot"], results["truncation"]
    return {"test_accuracy_pilot": results["pilot"]["accuracy"],
            "test_accuracy_pilot_copilot": pc["accuracy"],
            "val_accuracy_pilot": v["pilot_accuracy"],
            "chosen_lambda": pc["lambda"],
            "copilot_off": float(pc["copilot_off"]),
            "eval_max_new_tokens": float(results["decoding"]["max_new_tokens"]),
            "val_truncated_share": t["validation"]["share"],
            "test_truncated_share": t["test"]["share"]}


def _share(part: dict[str, Any]) -> str:
    return f"{part['share']:.1%} ({part['truncated']}/{part['generations']})"


def format_table(results: dict[str, Any]) -> str:
    """The human summary printed at the end of the main job (and by `tcp-eval`)."""
    v = results["validation"]
    tf = v["teacher_forced"]
    pc = results["pilot+copilot"]
    t = results["truncation"]
    n = max(results["test_size"], 1)
    lam = format(pc["lambda"], "g")
    if pc["copilot_off"]:
        why = ("the Copilot did not help on validation, so Pilot+Copilot is the Pilot alone"
               if v.get("copilot_helped") is False else "the Copilot is off (λ=0 given)")
        choice = f"λ=0: {why}"
    else:
        choice = (f"{pc['flips']} test decoding steps flipped, "
                  f"{pc['flipped_answers_correct']}/{pc['flipped_answers']} flipped answers "
                  "correct")
    lines = [
        "",
        f"{'':24}{'test accuracy':>15}{'cut at budget':>15}",
        f"{'Pilot':24}{results['pilot']['accuracy']:>15.4f}"
        f"{results['pilot']['truncated'] / n:>15.1%}",
        f"{'Pilot+Copilot (λ=' + lam + ')':24}{pc['accuracy']:>15.4f}{pc['truncated'] / n:>15.1%}",
        f"test n={results['test_size']}; λ chosen on validation (n={v['size']}, "
        f"Pilot {v['pilot_accuracy']:.4f}); {choice}",
        f"decoding budget {results['decoding']['budget']['description']}",
        "generations cut at the budget (no EOS or stop string; Pilot and Pilot+Copilot at "
        f"the chosen λ): validation "
        f"{_share(t['validation'])}, test {_share(t['test'])}",
    ]
    if t.get("warning"):
        lines.append(f"WARNING: {t['warning']}")
    lines += [
        "",
        "validation λ sweep (accuracy of generated answers; teacher-forced token fixes/breaks; "
        "generations cut at the budget):",
        f"{'λ':>6} {'accuracy':>9} {'Δ Pilot':>8} {'flips':>6} {'fixes':>6} {'breaks':>7} "
        f"{'cut':>5}",
        f"{0:>6g} {v['pilot_accuracy']:>9.4f} {0:>+8.4f} {0:>6} {'':>6} {'':>7} "
        f"{v.get('pilot_truncated', ''):>5}  Pilot (Copilot off)"
        + ("  <- chosen" if pc["copilot_off"] else ""),
    ]
    for s in v["sweep"]:
        fx = "" if s.get("tf_fixes") is None else s["tf_fixes"]
        br = "" if s.get("tf_breaks") is None else s["tf_breaks"]
        mark = "  <- chosen" if s["lambda"] == pc["lambda"] else ""
        lines.append(f"{s['lambda']:>6g} {s['accuracy']:>9.4f} "
                     f"{s['accuracy'] - v['pilot_accuracy']:>+8.4f} {s['flips']:>6} {fx:>6} "
                     f"{br:>7} {s.get('truncated', ''):>5}{mark}")
    lines += [
        "",
        f"Copilot RMSE {tf['copilot_rmse']:.4f} vs zero baseline {tf['zero_rmse']:.4f} "
        f"(ratio {tf['rmse_ratio']:.3f}); cos(f, ℓ) {tf['cosine']:.3f}",
        f"median max|f| {v['generation']['max_abs_f_median']:.4f}, "
        f"median Pilot top-1/top-2 margin {v['generation']['pilot_margin_median']:.4f}",
    ]
    if results.get("predictions"):
        lines.append(f"per-example predictions: {results['predictions']}")
    return "\n".join(lines)
