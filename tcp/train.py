"""The joint loop (METHOD.md §3, the paper's Algorithm 1) and the run around it.

Reads top-down: `run()` sets up -> `Trainer.train()` -> `train_step()` -> `pilot_step()` ->
log append -> `copilot_step()`; then `evaluate_and_report()`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tcp.budget import DecodeBudget, budget_for_pilot, truncation_summary
from tcp.checkpoint import CheckpointManager, rng_state, set_rng_state
from tcp.config import (
    KernelsConfig,
    MistakeLogConfig,
    RunConfig,
    dump_yaml,
    render_deepspeed,
    to_dict,
)
from tcp.data.collate import TokenizedSample, batch_indices, collate
from tcp.diagnostics import teacher_forced_diagnostics
from tcp.evaluate import (
    best_positive_lambda,
    choose_lambda,
    generation_eval,
    lambda_p_value,
)
from tcp.faults import fault_point
from tcp.generate import DecodeOptions
from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.collect import collect
from tcp.mistake_log.record import MistakeBatch
from tcp.models.copilot import ErrorTarget, build_inputs
from tcp.models.pilot import HeadOptions, PilotTap, pilot_forward, torch_dtype
from tcp.predictions import gather_rows, pair_rows, paired_summary, write_predictions
from tcp.preemption import StopSignal
from tcp.progress import Progress
from tcp.rectify import pick_example, trace_rectification
from tcp.tasks import decide_format
from tcp.tracking import Tracker


@dataclass
class StepMetrics:
    """What one joint step measured (this rank)."""

    pilot_loss: float
    copilot_loss: float | None = None
    zero_rmse: float | None = None
    tokens: int = 0
    residual: float = 0.0
    """Mean residual mass of this step's Mistake Log entries: the Pilot's probability outside
    the stored top-k, which the Copilot's sparse error input does not see."""


@dataclass
class History:
    """Averaged metrics at each logging interval (all ranks), kept for results.json."""

    rows: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Owns both engines, the tap and the Mistake Log for the joint loop."""

    def __init__(self, cfg: RunConfig, *, pilot: Any, copilot: Any, tap: PilotTap,
                 log: MistakeLog, samples: list[TokenizedSample], pad_id: int, rank: int,
                 world: int, device: torch.device, tracker: Tracker,
                 checkpoints: CheckpointManager | None = None,
                 stop: StopSignal | None = None) -> None:
        self.cfg, self.pilot, self.copilot, self.tap, self.log = cfg, pilot, copilot, tap, log
        self.samples, self.pad_id = samples, pad_id
        self.rank, self.world, self.device, self.tracker = rank, world, device, tracker
        self.checkpoints, self.stop = checkpoints, stop
        self.step = 0
        self.saved_step: int | None = None
        """Step of the newest checkpoint written or resumed from."""
        self.checkpoint_s = 0.0
        """Wall time spent writing checkpoints (this run, this rank)."""
        self.stopped_by: int | None = None
        """The signal that stopped `train()` early, if one did."""
        self.history = History()
        self.storage_dtype = torch_dtype(cfg.mistake_log.storage_dtype)

    # ------------------------------------------------------------------ loop
    def train(self) -> History:
        """Run steps from `self.step` to `train.total_steps` (the joint steps, then the Copilot
        tail), checkpointing every `checkpoint.every`; stops early (all ranks after the same
        step) on SIGTERM/SIGINT."""
        c = self.cfg.train
        every = self.cfg.checkpoint.every
        total = c.total_steps
        bar = Progress(total=total, desc="joint" if not c.copilot_tail_steps else "joint+tail",
                       enabled=self.rank == 0, initial=self.step)
        window: list[StepMetrics] = []
        t0 = time.time()
        while self.step < total:
            window.append(self.train_step())
            self.step += 1
            if self.step % c.log_every == 0 or self.step in (c.steps, total):
                row = self._reduce(window, time.time() - t0)
                self.history.rows.append(row)
                self.tracker.metrics({k: v for k, v in row.items() if k != "step"},
                                     step=self.step)
                bar.update(self.step, pilot=f"{row['pilot_loss']:.3f}",
                           copilot=f"{row.get('copilot_rmse', float('nan')):.4f}",
                           zero=f"{row.get('zero_rmse', float('nan')):.4f}",
                           tok_s=f"{row['tokens_per_s']:.0f}")
                window, t0 = [], time.time()
            if self.stop is not None:
                self.stopped_by = self.stop.should_stop(self.device)
                if self.stopped_by:
                    break
            if every and self.step % every == 0 and self.step < total:
                self.save_checkpoint()
        bar.close()
        return self.history

    def save_checkpoint(self) -> Path | None:
        """The composite checkpoint of the current step (collective); skipped if that step is
        already saved."""
        if self.checkpoints is None or self.saved_step == self.step:
            return None
        t0 = time.time()
        path = self.checkpoints.save(self.step, pilot=self.pilot, copilot=self.copilot,
                                     trainer_state=self.state_dict(),
                                     meta={"mlflow_run_id": self.tracker.run_id,
                                           "config": to_dict(self.cfg)})
        self.saved_step = self.step
        self.checkpoint_s += time.time() - t0
        if self.rank == 0:
            print(f"[tcp] checkpoint {path} ({time.time() - t0:.1f}s)", flush=True)
        return path

    def train_step(self) -> StepMetrics:
        """One joint step: Pilot forward/log/backward/step, then a Copilot update. In the
        Copilot tail (steps from `train.steps` on) the Pilot runs forward only, in eval mode:
        logged, never updated."""
        batch = self._batch(self.step)
        k = self.cfg.kernels
        tail = self.step >= self.cfg.train.steps
        if tail and self.pilot.training:
            self.pilot.eval()  # the final Pilot, as it is evaluated (no dropout)
        with torch.no_grad() if tail else contextlib.nullcontext():
            out = pilot_forward(self.pilot, self.tap, batch, pooled_dtype=self.storage_dtype,
                                head=HeadOptions(topk=self.cfg.mistake_log.topk,
                                                 fused=k.fused, impl=k.impl,
                                                 chunk_mib=k.chunk_mib))
        entries = collect(out, topk=self.cfg.mistake_log.topk, step=self.step, rank=self.rank,
                          sample_id=batch["sample_id"], storage_dtype=self.storage_dtype,
                          device=self.device)
        self.log.append(entries)  # asynchronous: the write overlaps the Pilot's backward
        fault_point("step", step=self.step, rank=self.rank)
        if not tail:
            self.pilot.backward(out.loss)
            self.pilot.step()
        m = StepMetrics(pilot_loss=float(out.loss.detach()),
                        tokens=int(batch["attention_mask"].sum()),
                        residual=float(entries.residual.float().mean())
                        if entries.residual.numel() else 0.0)
        if self.step >= self.cfg.train.copilot_start_step:
            m.copilot_loss, m.zero_rmse = self.copilot_step(entries)
        return m

    def copilot_step(self, current: MistakeBatch) -> tuple[float, float] | tuple[None, None]:
        """Copilot forward on current + replayed entries, RMSE loss, backward, step."""
        entries = copilot_entries(current, self.log, step=self.step, cfg=self.cfg.mistake_log,
                                  device=self.device)
        if entries is None:  # same on every rank: availability depends only on the step
            return None, None
        return copilot_update(self.copilot, entries, kernels=self.cfg.kernels,
                              device=self.device)

    # ------------------------------------------------------------------ helpers
    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        e = self.cfg.train.pilot
        idx = batch_indices(seed=self.cfg.seed, step=step, rank=self.rank, world_size=self.world,
                            micro_batch_size=e.micro_batch_size, num_samples=len(self.samples))
        return {k: v.to(self.device) for k, v in
                collate([self.samples[i] for i in idx], self.pad_id).items()}

    def _reduce(self, window: list[StepMetrics], seconds: float) -> dict[str, float]:
        cop = [m for m in window if m.copilot_loss is not None]
        vals = torch.tensor([
            sum(m.pilot_loss for m in window) / len(window),
            sum(m.copilot_loss for m in cop) / max(len(cop), 1),  # type: ignore[misc]
            sum(m.zero_rmse for m in cop) / max(len(cop), 1),  # type: ignore[misc]
            float(sum(m.tokens for m in window)),
            sum(m.residual for m in window) / len(window),
        ], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(vals)
        pl, cl, zr, tok, res = vals.tolist()
        row = {"step": float(self.step), "pilot_loss": pl / self.world,
               "residual_mass": res / self.world,
               "tokens_per_s": tok / max(seconds, 1e-9),
               "lr_pilot": float(self.pilot.get_lr()[0]),
               "lr_copilot": float(self.copilot.get_lr()[0])}
        row.update({f"mistake_log/{k}": v for k, v in self.log.metrics().items()})  # this rank
        if cop:
            row.update(copilot_rmse=cl / self.world, zero_rmse=zr / self.world)
            row["rmse_ratio"] = row["copilot_rmse"] / max(row["zero_rmse"], 1e-12)
        return row

    def state_dict(self) -> dict[str, Any]:
        """This rank's loop position, data position, RNGs, the Mistake Log's commit cursor and
        sampler, and the metric history (the engines checkpoint themselves). Flushes the log."""
        return {"rank": self.rank, "world_size": self.world, "step": self.step,
                "data": self._data_position(), "rng": rng_state(),
                "log": self.log.state_dict(), "history": self.history.rows}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise (ValueError, or the Mistake Log's error) if `load_state_dict(state)` would not
        fit this run: the data position, the log's sampler configuration and cursor. Changes
        nothing."""
        if state["data"] != self._data_position():
            raise ValueError(f"the checkpoint's data position {state['data']} does not match "
                             f"this run's {self._data_position()}: the training data, seed or "
                             "batch size changed; resume with the original ones")
        self.log.check_state_dict(state["log"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict` (after the engines are loaded): truncates the Mistake Log
        to the saved cursor and restores every RNG. Checks first (`check_state_dict`)."""
        self.check_state_dict(state)
        self.step = state["step"]
        self.saved_step = self.step
        self.log.load_state_dict(state["log"])
        self.history.rows = list(state["history"])
        set_rng_state(state["rng"])

    def _data_position(self) -> dict[str, int]:
        """Batches are a pure function of (seed, step, rank, world, batch size, dataset size),
        so the step is the data position; the rest must match for it to mean the same."""
        return {"seed": self.cfg.seed, "world_size": self.world,
                "micro_batch_size": self.cfg.train.pilot.micro_batch_size,
                "num_samples": len(self.samples)}


def copilot_entries(current: MistakeBatch, log: MistakeLog, *, step: int,
                    cfg: MistakeLogConfig, device: torch.device) -> MistakeBatch | None:
    """The Copilot's training entries at `step`: the current step's (on the compute device) and
    those replayed from the log (read on the host), joined on `device`; None when there are
    none yet. Replayed data enters the compute path here and nowhere else."""
    return join_entries(current, log.sample(step=step, num=cfg.replay_size),
                        include_current=cfg.include_current, device=device)


def join_entries(current: MistakeBatch | None, replay: MistakeBatch | None, *,
                 include_current: bool, device: torch.device) -> MistakeBatch | None:
    """The step's own entries (when `include_current` and there are any) followed by the
    replayed ones, on `device`; None when there are none. Joint and offline training
    (tcp.offline) both build the Copilot's batch here."""
    own = include_current and current is not None and current.num_entries > 0
    parts = [p for p in (current if own else None, replay) if p is not None]
    return MistakeBatch.cat(parts, device=device) if parts else None


def copilot_update(copilot: Any, entries: MistakeBatch, *, kernels: KernelsConfig,
                   device: torch.device) -> tuple[float, float]:
    """One step of the Copilot's engine on `entries`: RMSE loss against the sparse errors
    (METHOD.md §3), backward, step; returns (loss, the zero baseline's RMSE). Collective."""
    inputs = build_inputs(entries, device)
    target = ErrorTarget.from_batch(entries, device, fused=kernels.fused, impl=kernels.impl,
                                    chunk_mib=kernels.chunk_mib)
    loss, zero = copilot(inputs, target=target)  # fused: f is never materialised
    copilot.backward(loss)
    copilot.step()
    return float(loss.detach()), float(zero)


# ---------------------------------------------------------------------- evaluation & report
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
    rank 0 writes predictions.jsonl for the test split (every rank's shard; tcp.predictions);
    with it, "paired" holds the paired test of Pilot vs Pilot+Copilot on test (else None).
    `train_golds`: the training answers, which with validation's decide `eval.answer_format=auto`
    (recorded, with why, in "answer_format"); test answers never do.
    """
    ev = cfg.eval
    if lam is not None and lam < 0:
        raise ValueError(f"lambda must be >= 0 (got {lam}); 0 scores the Pilot alone")
    if budget is None:
        budget = budget_for_pilot(ev, {"validation": val_samples}, tokenizer, pilot=pilot,
                                  max_length=cfg.data.max_length)
    pilot.eval()
    copilot.eval()
    diag = teacher_forced_diagnostics(pilot, tap, copilot, val_samples,
                                      pad_id=tokenizer.pad_token_id, topk=cfg.mistake_log.topk,
                                      lambdas=ev.lambdas, fusion=ev.fusion,
                                      batch_size=ev.batch_size, rank=rank, world=world,
                                      device=device, chunk_mib=cfg.kernels.chunk_mib)
    # 'auto' is decided once, on train (`train_golds`) and validation golds, never test's: test is
    # read only after lambda is fixed (tests/unit/test_no_leaks.py); both splits score alike.
    fmt_decision = decide_format(ev.answer_format,
                                 [*(train_golds or []), *(r["answer"] for r in val_records)],
                                 source="train+validation" if train_golds else "validation")
    fmt = fmt_decision.format
    common = dict(opts=decode_options(cfg, max_new_tokens=budget.tokens),
                  batch_size=ev.batch_size, rank=rank, world=world, device=device,
                  answer_format=fmt)
    sweep_lams = ev.lambdas if lam is None else [lam] if lam > 0 else []
    val = generation_eval(pilot, tap, copilot, val_records, tokenizer,
                          lambdas=[0.0, *sweep_lams], **common)
    helped = None
    if lam is None:
        lam, _ = choose_lambda(val, ev.lambda_significance)
        helped = lam > 0
    test = generation_eval(pilot, tap, copilot, test_records, tokenizer,
                           lambdas=[0.0, lam] if lam > 0 else [0.0],
                           predictions_split="test" if predictions_path else None, **common)
    c = len(test.lambdas) - 1  # Pilot+Copilot's row: the Pilot's when the Copilot is off
    paired = None  # every rank's rows, so it matches the summed accuracies above
    if predictions_path is not None:
        rows = pair_rows(gather_rows(test.rows, world), lam)
        paired = paired_summary(rows, lam)
        if rank == 0:
            write_predictions(predictions_path, rows)
    # With the Copilot off, trace what the best lambda > 0 would have changed.
    trace_lam = lam or (best_positive_lambda(val) or (ev.lambdas[0], 0.0))[0]
    trace_kw = dict(lam=trace_lam, fusion=ev.fusion, max_new_tokens=budget.tokens,
                    device=device, feedback=ev.copilot_feedback)
    ex = pick_example(pilot, tap, copilot, val_records, tokenizer, answer_format=fmt,
                      **trace_kw)
    rect = trace_rectification(pilot, tap, copilot, val_records[ex]["prompt"], tokenizer,
                               gold=val_records[ex]["answer"], **trace_kw)
    tf_fixes, tf_breaks = diag["fixes"], diag["breaks"]
    return {
        "pilot": {"accuracy": test.accuracy[0], "truncated": test.truncated[0]},
        "pilot+copilot": {"accuracy": test.accuracy[c], "lambda": lam, "copilot_off": lam == 0,
                          "flips": test.flips[c], "flipped_answers": test.flipped_rows[c],
                          "flipped_answers_correct": test.flipped_rows_correct[c],
                          "truncated": test.truncated[c]},
        "test_size": test.n,
        "validation": {
            "size": val.n,
            "pilot_accuracy": val.accuracy[0],
            "pilot_truncated": val.truncated[0],
            "copilot_helped": helped,
            "sweep": [{"lambda": lv, "accuracy": a, "flips": fl, "flipped_answers": fr,
                       "flipped_answers_correct": fo, "truncated": tr,
                       "tf_fixes": tf_fixes.get(str(lv)), "tf_breaks": tf_breaks.get(str(lv)),
                       "fixes": fx, "breaks": bk, "mcnemar_p": lambda_p_value(val, i)}
                      for i, (lv, a, fl, fr, fo, tr, fx, bk) in enumerate(zip(
                          val.lambdas[1:], val.accuracy[1:], val.flips[1:],
                          val.flipped_rows[1:], val.flipped_rows_correct[1:], val.truncated[1:],
                          val.fixes[1:], val.breaks[1:], strict=True), start=1)],
            "lambda_significance": ev.lambda_significance,
            "teacher_forced": diag,
            "generation": {"max_abs_f_median": val.max_abs_f_median,
                           "pilot_margin_median": val.pilot_margin_median},
        },
        "fusion": ev.fusion,
        "decoding": {"strategy": ev.strategy, "copilot_feedback": ev.copilot_feedback,
                     "answer_format": test.answer_format,
                     "max_new_tokens": budget.tokens, "budget": budget.to_dict()},
        "answer_format": fmt_decision.to_dict(),
        "truncation": truncation_summary({"validation": val, "test": test}, ev,
                                         budget=budget.tokens, lam=lam),
        "predictions": str(predictions_path) if predictions_path else None,
        "paired": paired,
        "rectification": rect.to_dict() | {"validation_index": ex},
    }


def decode_options(cfg: RunConfig, *, max_new_tokens: int | None = None) -> DecodeOptions:
    """The run's decoding options (eval.*), sampling seeded by the run's seed; the budget is
    `max_new_tokens` (the resolved `eval.max_new_tokens`, tcp.budget) when given."""
    ev = cfg.eval
    if max_new_tokens is None:
        if ev.max_new_tokens == "auto":
            raise ValueError("eval.max_new_tokens is 'auto': resolve it first "
                             "(tcp.budget.resolve_budget) and pass max_new_tokens")
        max_new_tokens = ev.max_new_tokens
    return DecodeOptions(max_new_tokens=max_new_tokens, strategy=ev.strategy,
                         fusion=ev.fusion, num_beams=ev.num_beams,
                         length_penalty=ev.length_penalty, temperature=ev.temperature,
                         top_k=ev.top_k, top_p=ev.top_p, stop=list(ev.stop), seed=cfg.seed,
                         copilot_feedback=ev.copilot_feedback)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def ds_configs(cfg: RunConfig, world: int) -> dict[str, dict[str, Any]]:
    """Both engines' DeepSpeed configs."""
    return {"pilot": render_deepspeed(cfg, "pilot", world_size=world),
            "copilot": render_deepspeed(cfg, "copilot", world_size=world)}


def save_config(cfg: RunConfig, out: Path, world: int) -> None:
    """Resolved config and rendered DeepSpeed configs into the run directory (rank 0)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    write_json(out / "deepspeed.json", ds_configs(cfg, world))
