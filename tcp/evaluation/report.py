"""How evaluation results are shown: the printed table and the flat metrics MLflow records.

Both read the results dict of `tcp.evaluation.protocol.evaluate_and_report` (results.json), for the
main job and `tcp-eval` alike: the decoding budget used, the share of generations cut at it per
split (with the one warning over `eval.truncation_warn_frac`), and whether the Copilot was switched
off because no lambda > 0 beat the Pilot on validation; and the paired test of Pilot vs
Pilot+Copilot on the same test examples (results["paired"], tcp.evaluation.stats), absent from
results written before it existed.
"""

from __future__ import annotations

from typing import Any

from tcp.evaluation.stats import format_paired


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The headline numbers logged as MLflow metrics (accuracies, lambda, budget, truncation,
    the paired test when results have one)."""
    v, pc, t = results["validation"], results["pilot+copilot"], results["truncation"]
    return {"test_accuracy_pilot": results["pilot"]["accuracy"],
            "test_accuracy_pilot_copilot": pc["accuracy"],
            "val_accuracy_pilot": v["pilot_accuracy"],
            "chosen_lambda": pc["lambda"],
            "copilot_off": float(pc["copilot_off"]),
            "eval_max_new_tokens": float(results["decoding"]["max_new_tokens"]),
            "val_truncated_share": t["validation"]["share"],
            "test_truncated_share": t["test"]["share"]} | _paired_metrics(results)


def _paired_metrics(results: dict[str, Any]) -> dict[str, float]:
    p = results.get("paired")
    if not p:
        return {}
    lo, hi = p["diff_ci95"]
    return {"test_paired_diff": p["diff"], "test_paired_diff_ci95_lo": lo,
            "test_paired_diff_ci95_hi": hi, "test_paired_mcnemar_p": p["mcnemar_p"]}


def paired_line(results: dict[str, Any]) -> str | None:
    """The table's line for the paired test on test (None when results have none): the
    difference with its interval and McNemar's p, or why there is nothing to test."""
    p = results.get("paired")
    if not p:
        return None
    if p.get("copilot_off"):
        return (f"paired test (n={p['n']}): λ=0 chosen, so Pilot+Copilot is the Pilot on every "
                "test example: difference 0, McNemar p = 1 (nothing to test)")
    return f"paired test, Pilot+Copilot − Pilot: {format_paired(p)}"


def _share(part: dict[str, Any]) -> str:
    return f"{part['share']:.1%} ({part['truncated']}/{part['generations']})"


SMALL_VALIDATION = 1000
"""Below this many validation examples, a gain of a few points seldom passes the λ noise gate
(docs/archive/results-history.md: with 400, real 4-point gains failed it on one seed in three)."""


def _off_reason(v: dict[str, Any]) -> str:
    """Why validation switched the Copilot off: no λ beat the Pilot, or none beat it beyond
    noise (eval.lambda_significance)."""
    sweep = v["sweep"]
    best = max(sweep, key=lambda s: (s["accuracy"], -s["lambda"]), default=None)
    if best is None or best["accuracy"] <= v["pilot_accuracy"] or best.get("mcnemar_p") is None:
        return "the Copilot did not help on validation, so Pilot+Copilot is the Pilot alone"
    alpha = v.get("lambda_significance")
    need = f"; needs p < {alpha}/{len(sweep)}" if alpha is not None else ""
    small = (f". With {v['size']} validation examples a gain of a few points rarely passes: "
             f"give validation at least {SMALL_VALIDATION} examples"
             if v["size"] < SMALL_VALIDATION else "")
    return (f"no λ gained beyond noise on validation (the most accurate, λ={best['lambda']:g}: "
            f"{best['fixes']} fixed, {best['breaks']} broken, McNemar p = "
            f"{best['mcnemar_p']:.3g}{need}; eval.lambda_significance), so Pilot+Copilot is the "
            f"Pilot alone{small}")


def format_table(results: dict[str, Any]) -> str:
    """The human summary printed at the end of the main job (and by `tcp-eval`)."""
    v = results["validation"]
    tf = v["teacher_forced"]
    pc = results["pilot+copilot"]
    t = results["truncation"]
    n = max(results["test_size"], 1)
    lam = format(pc["lambda"], "g")
    paired = paired_line(results)
    if pc["copilot_off"]:
        why = ("the Copilot is off (λ=0 given)" if v.get("copilot_helped") is not False
               else _off_reason(v))
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
        *([paired] if paired else []),
        f"decoding budget {results['decoding']['budget']['description']}",
        "generations cut at the budget (no EOS or stop string; Pilot and Pilot+Copilot at "
        f"the chosen λ): validation "
        f"{_share(t['validation'])}, test {_share(t['test'])}",
    ]
    if t.get("warning"):
        lines.append(f"WARNING: {t['warning']}")
    lines += [
        "",
        "validation λ sweep (accuracy of generated answers; answers fixed/broken against the "
        "Pilot and McNemar p; teacher-forced token fixes/breaks; generations cut at the budget):",
        f"{'λ':>6} {'accuracy':>9} {'Δ Pilot':>8} {'fixed':>6} {'broken':>6} {'p':>8} "
        f"{'flips':>6} {'tf fix':>6} {'tf brk':>6} {'cut':>5}",
        f"{0:>6g} {v['pilot_accuracy']:>9.4f} {0:>+8.4f} {'':>6} {'':>6} {'':>8} {0:>6} {'':>6} "
        f"{'':>6} {v.get('pilot_truncated', ''):>5}  Pilot (Copilot off)"
        + ("  <- chosen" if pc["copilot_off"] else ""),
    ]
    for s in v["sweep"]:
        fx = "" if s.get("tf_fixes") is None else s["tf_fixes"]
        br = "" if s.get("tf_breaks") is None else s["tf_breaks"]
        mark = "  <- chosen" if s["lambda"] == pc["lambda"] else ""
        p = "" if s.get("mcnemar_p") is None else f"{s['mcnemar_p']:.3g}"
        lines.append(f"{s['lambda']:>6g} {s['accuracy']:>9.4f} "
                     f"{s['accuracy'] - v['pilot_accuracy']:>+8.4f} {s.get('fixes', ''):>6} "
                     f"{s.get('breaks', ''):>6} {p:>8} {s['flips']:>6} {fx:>6} "
                     f"{br:>6} {s.get('truncated', ''):>5}{mark}")
    lines += [
        "",
        f"Copilot RMSE {tf['copilot_rmse']:.4f} vs zero baseline {tf['zero_rmse']:.4f} "
        f"(ratio {tf['rmse_ratio']:.3f}); cos(f, ℓ) {tf['cosine']:.3f}",
        f"median max|f| {v['generation']['max_abs_f_median']:.4f}, "
        f"median Pilot top-1/top-2 margin {v['generation']['pilot_margin_median']:.4f}",
    ]
    last = (results.get("history") or [{}])[-1]
    if "residual_mass" in last:  # training, last logging interval
        lines.append(f"residual mass (Pilot probability outside the logged top-k, training): "
                     f"{last['residual_mass']:.4f}")
    if results.get("predictions"):
        lines.append(f"per-example predictions: {results['predictions']}")
    return "\n".join(lines)
