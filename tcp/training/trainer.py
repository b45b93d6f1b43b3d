"""The joint loop (docs/method.md §5, the paper's Algorithm 1): the Trainer and its state.

Reads top-down: `tcp.training.joint_job.run()` sets up -> `Trainer.train()` -> `train_step()`
-> `pilot_step()` -> log append -> `copilot_step()` (tcp.training.copilot_update).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tcp.config import RunConfig, to_dict
from tcp.data.collate import TokenizedSample, batch_indices, collate
from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.record import MistakeBatch
from tcp.models.lm_head import HeadOptions
from tcp.models.log_entries import collect
from tcp.models.pilot import PilotTap, pilot_forward, torch_dtype
from tcp.runtime.collective import sum_across_ranks
from tcp.runtime.console import Progress, logger
from tcp.runtime.faults import fault_point
from tcp.runtime.preemption import StopSignal
from tcp.runtime.tracking import Tracker
from tcp.training.checkpoint import CheckpointManager
from tcp.training.copilot_update import copilot_entries, copilot_update
from tcp.training.metrics import History, copilot_metrics
from tcp.training.rng_state import rng_state, set_rng_state


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
            logger.info(f"[tcp] checkpoint {path} ({time.time() - t0:.1f}s)")
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
        """The logging interval's row: every rank's window means, averaged (collective)."""
        updated = [m for m in window if m.copilot_loss is not None]
        pilot_loss, copilot_rmse, zero_rmse, tokens, residual = sum_across_ranks([
            sum(m.pilot_loss for m in window) / len(window),
            sum(m.copilot_loss for m in updated) / max(len(updated), 1),  # type: ignore[misc]
            sum(m.zero_rmse for m in updated) / max(len(updated), 1),  # type: ignore[misc]
            float(sum(m.tokens for m in window)),
            sum(m.residual for m in window) / len(window),
        ], self.device)
        row = {"step": float(self.step), "pilot_loss": pilot_loss / self.world,
               "residual_mass": residual / self.world,
               "tokens_per_s": tokens / max(seconds, 1e-9),
               "lr_pilot": float(self.pilot.get_lr()[0]),
               "lr_copilot": float(self.copilot.get_lr()[0])}
        row.update({f"mistake_log/{k}": v for k, v in self.log.metrics().items()})  # this rank
        if updated:
            row.update(copilot_metrics(copilot_rmse, zero_rmse, self.world))
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
