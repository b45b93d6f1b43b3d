"""Offline Copilot training: a fresh Copilot learns from a finished run's recorded Mistake Log
alone (no Pilot forward or backward), then is evaluated with that run's final Pilot.

    deepspeed --num_gpus 2 launcher/train.py --offline-from runs/seed0 output_dir=runs/off \\
        copilot.hidden_size=64 copilot.init_from=none

Reads top-down: `run_offline()` claims the output folder and checks the source
(tcp.training.offline_source) -> builds the Copilot's DeepSpeed engine only ->
`OfflineTrainer.train()`: for each recorded step t, `RecordedStream.entries(t)` (the step's own
entries, read from this rank's shard, plus the sampler's replay draw: the stream the joint run's
Copilot saw) -> `tcp.training.copilot_update` (the same RMSE loss) -> save `final/copilot.pt` ->
evaluate with the source's Pilot through tcp-eval's functions (λ sweep on validation, test once).
Rank r reads shard r, so the world size must equal the log's shard count. No checkpoints: a
stopped offline job is started again.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tcp.config import RunConfig, render_deepspeed
from tcp.evaluation.decode_budget import check_truncation
from tcp.evaluation.run_loading import evaluate_run, load_eval_data, load_run
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.sampler import replay_sampler
from tcp.runtime.collective import distributed, raise_if_any, sum_across_ranks
from tcp.runtime.console import Progress, logger
from tcp.runtime.quiet import hf_progress_off
from tcp.runtime.read_marks import ReadMark
from tcp.runtime.run_folder import claim_paths
from tcp.runtime.tracking import Tracker
from tcp.training.build import build_copilot
from tcp.training.copilot_update import copilot_update, join_entries
from tcp.training.engines import build_engine, param_count, save_module
from tcp.training.job import JobContext, JobEnd, publish_results, run_job
from tcp.training.metrics import History, copilot_metrics
from tcp.training.offline_source import OfflineError, SourceRun, offline_seed, open_source
from tcp.training.run_files import save_run_files


def run_offline(cfg: RunConfig) -> dict[str, Any]:
    """The offline job (`cfg.offline.source` set). Collective: every rank calls it. Bad input
    raises `RunError` on every rank before any model loads (exit 2)."""
    return run_job(cfg, claim=lambda c, rank: claim_paths([Path(c.output_dir)], rank=rank),
                   body=_run)


def _run(cfg: RunConfig, job: JobContext) -> dict[str, Any]:
    rank, world, device, t_start = job.rank, job.world, job.device, job.t_start
    out = Path(cfg.output_dir)
    src, data, stream = prepare(cfg, rank=rank, world=world)
    if data is not None:
        cfg = data.cfg  # data.max_length resolved
    for line in src.notes:
        logger.info(line)
    if rank == 0:
        save_run_files(cfg, out, world, src.tokenizer)
    tracker: Tracker | None = None
    end = JobEnd()
    try:
        copilot = build_offline_copilot(cfg, src, world=world)
        n_c = param_count(copilot.module)
        logger.info(f"[tcp] offline Copilot ({n_c / 1e6:.2f}M params) from {src.log}: steps "
                    f"{src.steps.start}..{src.steps.stop - 1}, world={world} "
                    f"device={device.type}")
        tracker = Tracker(cfg, rank=rank)
        tracker.tags({"tcp.offline_from": str(src.path)})
        t0 = time.time()
        trainer = OfflineTrainer(cfg, copilot=copilot, stream=stream, steps=src.steps,
                                 rank=rank, world=world, device=device, tracker=tracker)
        trainer.train()
        save_module(copilot.module, out / "final" / "copilot.pt")
        t_train = time.time()
        logger.info(f"[tcp] offline Copilot training done in {t_train - t0:.1f}s")
        results: dict[str, Any] = {"offline_from": str(src.path), "mistake_log": str(src.log),
                                   "steps": [src.steps.start, src.steps.stop - 1],
                                   "skipped_steps": trainer.skipped, "seed": cfg.seed,
                                   "offline_seed": offline_seed(cfg)}
        if data is not None:
            results.update(evaluate(cfg, out, src, data, rank=rank, world=world,
                                    device=device))
        results.update(history=trainer.history.rows, params={"copilot": n_c}, world_size=world,
                       seconds={"train": t_train - t0, "eval": time.time() - t_train,
                                "total": time.time() - t_start},
                       mlflow_run_id=tracker.run_id)
        if rank == 0:  # with the RMSE against the jointly trained Copilot's as metrics
            rmse = results.get("copilot_rmse", {})
            publish_results(results, out, tracker, step=len(src.steps), t_start=t_start,
                            metrics={f"val/copilot_rmse_{k}": v for k, v in rmse.items()
                                     if v is not None})
        check_truncation(results)  # eval.strict: fails every rank alike, results written
        end.status = "FINISHED"
        return results
    except BaseException as e:
        end.record(e)
        raise
    finally:
        stream.close()
        end.close(tracker)


def prepare(cfg: RunConfig, *, rank: int,
            world: int) -> tuple[SourceRun, Any, RecordedStream]:
    """Every check before any model loads (collective; the ranks agree on the outcome): the source
    (tcp.training.offline_source), the evaluation data (a bad file is a DataError), this rank's
    shard. Returns the source, the evaluation data (None with eval.enabled=false), the stream."""
    src = data = stream = None
    marks: list[ReadMark] = []
    error: BaseException | None = None
    try:
        src = open_source(cfg, world=world)
        if cfg.eval.enabled:
            data = load_eval_data(src.path, cfg, pilot_from=None, limit=None)
        # Marked while read: tcp-log and runs refuse to change them meanwhile
        # (tcp.runtime.read_marks).
        for folder in dict.fromkeys([src.path, src.log]):
            marks.append(ReadMark(folder).acquire(
                why="wait for it to finish, then train offline from its log"))
        stream = RecordedStream(src.log, rank=rank,
                                cfg=data.cfg if data is not None else cfg, marks=marks)
    except Exception as e:  # reported as one line on every rank
        error = e
    try:
        raise_if_any(error)
    except BaseException:
        if stream is not None:
            stream.close()
        for mark in marks:
            mark.release()
        raise
    assert src is not None and stream is not None
    return src, data, stream


def build_offline_copilot(cfg: RunConfig, src: SourceRun, *, world: int) -> Any:
    """A fresh Copilot for the source's Pilot (`copilot.*`, seeded by `offline.seed`) in its
    DeepSpeed engine (`train.copilot.*`). Collective."""
    seeded = dataclasses.replace(cfg, seed=offline_seed(cfg))
    torch.manual_seed(seeded.seed)
    model = build_copilot(seeded, vocab=src.vocab, d_pilot=src.d_pilot, base=src.base,
                          pilot_encoder_decoder=src.encoder_decoder, tokenizer=src.tokenizer)
    return build_engine(model, render_deepspeed(cfg, "copilot", world_size=world))


def evaluate(cfg: RunConfig, out: Path, src: SourceRun, data: Any, *, rank: int, world: int,
             device: torch.device) -> dict[str, Any]:
    """The saved Copilot with the source run's Pilot, through tcp-eval's functions (every rank
    scores its shard): λ sweep on validation, test once, predictions.jsonl; and the validation
    RMSE next to the jointly trained Copilot's."""
    torch.manual_seed(cfg.seed)
    with hf_progress_off():  # local folders: no loading bar per rank
        loaded = load_run(out, cfg, pilot_from=src.path, device=device)
    res = evaluate_run(loaded, data, lam=None, device=device, rank=rank, world=world,
                       predictions_path=out / "predictions.jsonl")
    mine = res["validation"]["teacher_forced"]["copilot_rmse"]
    joint = src.joint_copilot_rmse
    res["copilot_rmse"] = {"offline": mine, "joint": joint,
                           "ratio": mine / joint if joint else None}
    res["pilot"] = res["pilot"] | {"source": loaded.pilot_source}
    logger.info(f"[tcp] validation Copilot RMSE: offline {mine:.4f}"
                + (f", jointly trained {joint:.4f} (ratio {mine / joint:.3f})" if joint else ""))
    return res


class RecordedStream:
    """Rank r's shard of a finished Mistake Log, served as the joint run's Copilot saw it: at
    step t the step's own entries (`mistake_log.include_current`) and the sampler's replay
    draw, a pure function of (seed, t, rank) and the log (tcp.mistake_log.sampler)."""

    def __init__(self, root: Path, *, rank: int, cfg: RunConfig,
                 marks: list[ReadMark] | None = None) -> None:
        """`marks`: this process's read marks on the source, released by `close`."""
        ml, st = cfg.mistake_log, cfg.mistake_log.store
        self.root, self.include_current = root, ml.include_current
        self.marks = list(marks or [])
        self.reader = RankStoreReader(root, rank, cache_mib=st.read_cache_mib)
        # A second reader for the step's own entries: the sampler's prefetch thread uses the
        # first one (a reader is not shared between threads).
        self.current = RankStoreReader(root, rank, cache_mib=st.read_cache_mib) \
            if ml.include_current else None
        self.sampler = replay_sampler(  # no tail/submitted: the log is finished
            self.reader, st, window_steps=None if ml.window_steps == "all" else ml.window_steps,
            replay_size=ml.replay_size, seed=offline_seed(cfg), rank=rank)

    def entries(self, step: int, device: torch.device) -> MistakeBatch | None:
        """The Copilot's batch at `step` on `device` (None when there is nothing to train on)."""
        own = None
        if self.current is not None:
            own = self.current.read_range(*self.current.entry_range(step, step + 1))
        return join_entries(own, self.sampler.sample(step), include_current=self.include_current,
                            device=device)

    def close(self) -> None:
        self.sampler.close()
        for mark in self.marks:
            mark.release()


class OfflineTrainer:
    """The Copilot's half of the joint loop (tcp.training.trainer.Trainer), fed from a recorded
    log."""

    def __init__(self, cfg: RunConfig, *, copilot: Any, stream: RecordedStream, steps: range,
                 rank: int, world: int, device: torch.device, tracker: Tracker) -> None:
        self.cfg, self.copilot, self.stream, self.steps = cfg, copilot, stream, steps
        self.rank, self.world, self.device, self.tracker = rank, world, device, tracker
        self.history = History()
        self.skipped = 0
        """Steps where some rank had no entries (a pruned log); every rank skipped them."""

    def train(self) -> History:
        """One Copilot step per recorded step, in order; a row of metrics every
        `train.log_every` steps (the same boundaries as the joint run's history)."""
        bar = Progress(total=len(self.steps), desc="offline", enabled=self.rank == 0)
        window: list[tuple[float, float, int]] = []
        t0 = time.time()
        for i, step in enumerate(self.steps):
            entries = self._entries(step)
            if entries is not None:
                loss, zero = copilot_update(self.copilot, entries, kernels=self.cfg.kernels,
                                            device=self.device)
                window.append((loss, zero, entries.num_tokens))
            if (step + 1) % self.cfg.train.log_every == 0 or step + 1 == self.steps.stop:
                row = self._reduce(step + 1, window, time.time() - t0)
                self.history.rows.append(row)
                self.tracker.metrics({k: v for k, v in row.items() if k != "step"},
                                     step=step + 1)
                bar.update(i + 1, copilot=f"{row.get('copilot_rmse', float('nan')):.4f}",
                           zero=f"{row.get('zero_rmse', float('nan')):.4f}",
                           tok_s=f"{row['copilot_tokens_per_s']:.0f}")
                window, t0 = [], time.time()
        bar.close()
        return self.history

    def _entries(self, step: int) -> MistakeBatch | None:
        """This rank's batch at `step`, or None on every rank when any rank has none (a
        ZeRO-3 step is collective). A read that fails on any rank fails all of them."""
        entries, error = None, None
        try:
            entries = self.stream.entries(step, self.device)
        except Exception as e:  # a corrupt chunk, a file gone: one line, every rank
            error = OfflineError(f"reading step {step} of {self.stream.root} failed "
                                 f"({type(e).__name__}: {e}); check the log with "
                                 f"`tcp-log verify {self.stream.root}`")
        raise_if_any(error)
        have = torch.tensor([int(entries is not None)], device=self.device)
        if distributed():
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
        if not int(have):
            self.skipped += 1
            return None
        return entries

    def _reduce(self, step: int, window: list[tuple[float, float, int]],
                seconds: float) -> dict[str, float]:
        """The logging interval's row: every rank's window means, averaged (collective)."""
        n = max(len(window), 1)
        copilot_rmse, zero_rmse, tokens = sum_across_ranks(
            [sum(w[0] for w in window) / n, sum(w[1] for w in window) / n,
             float(sum(w[2] for w in window))], self.device)
        row = {"step": float(step), "copilot_tokens_per_s": tokens / max(seconds, 1e-9),
               "lr_copilot": float(self.copilot.get_lr()[0])}
        if window:  # the same on every rank (skips are agreed)
            row.update(copilot_metrics(copilot_rmse, zero_rmse, self.world))
        return row
