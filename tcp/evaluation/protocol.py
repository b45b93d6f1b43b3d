"""The evaluation protocol (docs/method.md §6.4): teacher-forced diagnostics and the λ sweep on
validation, λ chosen there (0, "Copilot off", always a candidate), test decoded once with the
Pilot alone and at the chosen λ, the paired test and one traced rectification. Used by the joint
run, the offline run and `tcp-eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tcp.config import RunConfig
from tcp.data.collate import TokenizedSample
from tcp.evaluation.answer_scoring import decide_format
from tcp.evaluation.decode_budget import DecodeBudget, budget_for_pilot, truncation_summary
from tcp.evaluation.decoding import DecodeOptions
from tcp.evaluation.diagnostics import teacher_forced_diagnostics
from tcp.evaluation.generation_eval import GenResult, generation_eval
from tcp.evaluation.lambda_choice import best_positive_lambda, choose_lambda, lambda_p_value
from tcp.evaluation.predictions import gather_rows, pair_rows, paired_summary, write_predictions
from tcp.evaluation.rectification import pick_example, trace_rectification
from tcp.models.pilot import PilotTap


def evaluate_and_report(cfg: RunConfig, *, pilot: Any, copilot: Any, tap: PilotTap,
                        tokenizer: Any, val_records: list[dict[str, str]],
                        test_records: list[dict[str, str]], val_samples: list[TokenizedSample],
                        rank: int, world: int, device: torch.device,
                        lam: float | None = None, budget: DecodeBudget | None = None,
                        predictions_path: Path | None = None,
                        train_golds: list[str] | None = None) -> dict[str, Any]:
    """Teacher-forced diagnostics and the lambda sweep on validation, lambda 0 ("Copilot off")
    included; test decoded once, with the Pilot alone and at the chosen lambda (or at `lam`
    when given: no sweep; 0 switches the Copilot off); truncation at the budget per split; one
    traced rectification example. Collective.

    `pilot`/`copilot` are DeepSpeed engines or plain modules. `budget`: the resolved
    `eval.max_new_tokens` (None: resolved here from `val_samples`). `predictions_path`: where
    rank 0 writes predictions.jsonl for the test split (every rank's shard;
    tcp.evaluation.predictions); with it, "paired" holds the paired test of Pilot vs
    Pilot+Copilot on test (else None). `train_golds`: the training answers, which with
    validation's decide `eval.answer_format=auto` (recorded, with why, in "answer_format");
    test answers never do.
    """
    eval_cfg = cfg.eval
    if lam is not None and lam < 0:
        raise ValueError(f"lambda must be >= 0 (got {lam}); 0 scores the Pilot alone")
    if budget is None:
        budget = budget_for_pilot(eval_cfg, {"validation": val_samples}, tokenizer, pilot=pilot,
                                  max_length=cfg.data.max_length)
    pilot.eval()
    copilot.eval()
    diagnostics = teacher_forced_diagnostics(
        pilot, tap, copilot, val_samples, pad_id=tokenizer.pad_token_id,
        topk=cfg.mistake_log.topk, lambdas=eval_cfg.lambdas, fusion=eval_cfg.fusion,
        batch_size=eval_cfg.batch_size, rank=rank, world=world, device=device,
        chunk_mib=cfg.kernels.chunk_mib)
    # 'auto' is decided once, on train (`train_golds`) and validation golds, never test's: test is
    # read only after lambda is fixed (tests/unit/test_no_leaks.py); both splits score alike.
    format_decision = decide_format(
        eval_cfg.answer_format, [*(train_golds or []), *(r["answer"] for r in val_records)],
        source="train+validation" if train_golds else "validation")
    answer_format = format_decision.format
    common = dict(opts=decode_options(cfg, max_new_tokens=budget.tokens),
                  batch_size=eval_cfg.batch_size, rank=rank, world=world, device=device,
                  answer_format=answer_format)
    sweep_lambdas = eval_cfg.lambdas if lam is None else [lam] if lam > 0 else []
    val = generation_eval(pilot, tap, copilot, val_records, tokenizer,
                          lambdas=[0.0, *sweep_lambdas], **common)
    helped = None
    if lam is None:
        lam, _ = choose_lambda(val, eval_cfg.lambda_significance)
        helped = lam > 0
    test = generation_eval(pilot, tap, copilot, test_records, tokenizer,
                           lambdas=[0.0, lam] if lam > 0 else [0.0],
                           predictions_split="test" if predictions_path else None, **common)
    fused = len(test.lambdas) - 1  # Pilot+Copilot's row: the Pilot's when the Copilot is off
    paired = None  # every rank's rows, so it matches the summed accuracies above
    if predictions_path is not None:
        rows = pair_rows(gather_rows(test.rows, world), lam)
        paired = paired_summary(rows, lam)
        if rank == 0:
            write_predictions(predictions_path, rows)
    # With the Copilot off, trace what the best lambda > 0 would have changed.
    trace_lambda = lam or (best_positive_lambda(val) or (eval_cfg.lambdas[0], 0.0))[0]
    trace_kw = dict(lam=trace_lambda, fusion=eval_cfg.fusion, max_new_tokens=budget.tokens,
                    device=device, feedback=eval_cfg.copilot_feedback)
    example = pick_example(pilot, tap, copilot, val_records, tokenizer,
                           answer_format=answer_format, **trace_kw)
    rectification = trace_rectification(pilot, tap, copilot, val_records[example]["prompt"],
                                         tokenizer, gold=val_records[example]["answer"],
                                         **trace_kw)
    return {
        "pilot": {"accuracy": test.accuracy[0], "truncated": test.truncated[0]},
        "pilot+copilot": {"accuracy": test.accuracy[fused], "lambda": lam,
                          "copilot_off": lam == 0, "flips": test.flips[fused],
                          "flipped_answers": test.flipped_rows[fused],
                          "flipped_answers_correct": test.flipped_rows_correct[fused],
                          "truncated": test.truncated[fused]},
        "test_size": test.n,
        "validation": {
            "size": val.n,
            "pilot_accuracy": val.accuracy[0],
            "pilot_truncated": val.truncated[0],
            "copilot_helped": helped,
            "sweep": sweep_rows(val, diagnostics),
            "lambda_significance": eval_cfg.lambda_significance,
            "teacher_forced": diagnostics,
            "generation": {"max_abs_f_median": val.max_abs_f_median,
                           "pilot_margin_median": val.pilot_margin_median},
        },
        "fusion": eval_cfg.fusion,
        "decoding": {"strategy": eval_cfg.strategy,
                     "copilot_feedback": eval_cfg.copilot_feedback,
                     "answer_format": test.answer_format,
                     "max_new_tokens": budget.tokens, "budget": budget.to_dict()},
        "answer_format": format_decision.to_dict(),
        "truncation": truncation_summary({"validation": val, "test": test}, eval_cfg,
                                         budget=budget.tokens, lam=lam),
        "predictions": str(predictions_path) if predictions_path else None,
        "paired": paired,
        "rectification": rectification.to_dict() | {"validation_index": example},
    }


def sweep_rows(val: GenResult, diagnostics: dict[str, Any]) -> list[dict[str, Any]]:
    """results.json's validation "sweep": one row per λ > 0 of `val` (row 0 is the Pilot's),
    with the teacher-forced fixes/breaks at that λ from `diagnostics`."""
    rows = []
    for i in range(1, len(val.lambdas)):
        key = str(val.lambdas[i])
        rows.append({"lambda": val.lambdas[i], "accuracy": val.accuracy[i],
                     "flips": val.flips[i], "flipped_answers": val.flipped_rows[i],
                     "flipped_answers_correct": val.flipped_rows_correct[i],
                     "truncated": val.truncated[i],
                     "tf_fixes": diagnostics["fixes"].get(key),
                     "tf_breaks": diagnostics["breaks"].get(key),
                     "fixes": val.fixes[i], "breaks": val.breaks[i],
                     "mcnemar_p": lambda_p_value(val, i)})
    return rows


def decode_options(cfg: RunConfig, *, max_new_tokens: int | None = None) -> DecodeOptions:
    """The run's decoding options (eval.*), sampling seeded by the run's seed; the budget is
    `max_new_tokens` (the resolved `eval.max_new_tokens`, tcp.evaluation.decode_budget) when
    given."""
    eval_cfg = cfg.eval
    if max_new_tokens is None:
        if eval_cfg.max_new_tokens == "auto":
            raise ValueError("eval.max_new_tokens is 'auto': resolve it first "
                             "(tcp.evaluation.decode_budget.resolve_budget) and pass "
                             "max_new_tokens")
        max_new_tokens = eval_cfg.max_new_tokens
    return DecodeOptions(max_new_tokens=max_new_tokens, strategy=eval_cfg.strategy,
                         fusion=eval_cfg.fusion, num_beams=eval_cfg.num_beams,
                         length_penalty=eval_cfg.length_penalty,
                         temperature=eval_cfg.temperature, top_k=eval_cfg.top_k,
                         top_p=eval_cfg.top_p, stop=list(eval_cfg.stop), seed=cfg.seed,
                         copilot_feedback=eval_cfg.copilot_feedback)
