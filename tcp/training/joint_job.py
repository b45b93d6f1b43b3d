"""The joint run (the main job): claim the folders, set up data and models (tcp.training.build),
train jointly (tcp.training.trainer), evaluate (tcp.evaluation.protocol), save, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tcp.config import RunConfig, resolve_epochs, to_dict
from tcp.data.prepare import model_context, prepare_data
from tcp.evaluation.decode_budget import budget_for_pilot, check_truncation
from tcp.evaluation.protocol import evaluate_and_report
from tcp.mistake_log.base import MistakeLog
from tcp.runtime.collective import raise_if_any
from tcp.runtime.console import logger
from tcp.runtime.preemption import LauncherWatch, StopSignal
from tcp.runtime.run_folder import claim_folders
from tcp.runtime.tracking import Tracker, flatten
from tcp.training.base_phase import ensure_base_model
from tcp.training.build import build_engines, build_mistake_log, load_tokenizer
from tcp.training.checkpoint import CheckpointManager
from tcp.training.checkpoint_layout import CheckpointError, CheckpointInfo, step_name
from tcp.training.engines import param_count, save_hf, save_hf_lora, save_module
from tcp.training.job import JobContext, JobEnd, publish_results, run_job
from tcp.training.run_files import save_run_files
from tcp.training.trainer import Trainer


def run(cfg: RunConfig) -> dict[str, Any]:
    """The main job. Collective: every rank calls it. Returns results; `results["stopped_by"]`
    is the signal number when SIGTERM/SIGINT (or the launcher's exit) stopped training, after
    a clean checkpoint. Operator errors raise `RunError` on every rank (exit 2)."""
    return run_job(cfg, claim=lambda c, rank: claim_folders(c, rank=rank), body=_run)


def _run(cfg: RunConfig, job: JobContext) -> dict[str, Any]:
    rank, world, device, t_start = job.rank, job.world, job.device, job.t_start
    out = Path(cfg.output_dir)
    ckpts = CheckpointManager(cfg.checkpoint, out, rank=rank, world=world)
    ckpts.check_shared()  # every rank writes its parts there
    resumed = ckpts.resolve(cfg.resume)  # a bad resume fails here, before any model loads
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)

    # Data before any model: a bad file fails here (DataError, exit 2); 'auto' becomes a number.
    data = prepare_data(cfg, tokenizer, context=model_context(cfg, tokenizer))
    cfg, splits = data.cfg, data.splits
    train_samples, val_samples = data.samples["train"], data.samples["validation"]
    for line in data.notes:
        logger.info(line)
    if cfg.train.epochs is not None:
        cfg = resolve_epochs(cfg, num_samples=len(train_samples), world_size=world)
        logger.info(f"[tcp] train.epochs={cfg.train.epochs:g} over {len(train_samples)} samples "
                    f"= {cfg.train.steps} steps")
    if rank == 0 and resumed is None:  # a resume writes them once it has been checked
        save_run_files(cfg, out, world, tokenizer)

    base = None
    if cfg.model.name_or_path is None and cfg.base.enabled:
        base = ensure_base_model(cfg, tokenizer, rank=rank, world=world, device=device)
    t_base = time.time()
    pilot, copilot, tap = build_engines(cfg, tokenizer, base, world)
    pilot_model, copilot_model = pilot.module, copilot.module
    vocab, d_pilot = int(pilot_model.config.vocab_size), int(pilot_model.config.hidden_size)
    partitioned = {"pilot": zero3_partitioned(pilot_model, world),
                   "copilot": zero3_partitioned(copilot_model, world)}
    n_p, n_c = param_count(pilot_model), param_count(copilot_model)
    logger.info(f"[tcp] world={world} device={device.type}; Pilot {n_p / 1e6:.2f}M params, "
                f"Copilot {n_c / 1e6:.2f}M params; {len(train_samples)} train samples")
    # eval.max_new_tokens 'auto' is sized here, once, from the tokenized answers.
    budget = budget_for_pilot(cfg.eval, {"train": train_samples, "validation": val_samples},
                              tokenizer, pilot=pilot_model, max_length=cfg.data.max_length)
    if cfg.eval.enabled:
        logger.info(f"[tcp] {budget.describe()}")

    tracker = Tracker(cfg, rank=rank,
                      run_id=resumed.manifest.get("mlflow_run_id") if resumed else None)
    # From here on the MLflow run exists: however the job ends, it is closed with a status.
    end = JobEnd()
    log: MistakeLog | None = None
    stop = watch = None
    try:
        if resumed is None:
            ckpts.prepare(None)  # a fresh run replaces a previous run's checkpoints
        log = build_mistake_log(cfg, out, rank=rank, d_model=d_pilot, vocab=vocab,
                                resume=resumed is not None)
        if cfg.checkpoint.on_signal:
            stop = StopSignal().install()
            watch = LauncherWatch(stop).start()  # the runner's exit counts as SIGTERM
        trainer = Trainer(cfg, pilot=pilot, copilot=copilot, tap=tap, log=log,
                          samples=train_samples, pad_id=tokenizer.pad_token_id, rank=rank,
                          world=world, device=device, tracker=tracker, checkpoints=ckpts,
                          stop=stop)
        if resumed is not None:
            resume_from(resumed, trainer, ckpts, tracker)
            if rank == 0:
                save_run_files(cfg, out, world, tokenizer)
        if rank == 0:
            tracker.artifact(out / "config.yaml")
            tracker.artifact(out / "deepspeed.json")
        trainer.train()
        trainer.save_checkpoint()  # the last step, or where a signal stopped us
        if stop is not None:  # a signal during that save still stops the job (all ranks agree)
            trainer.stopped_by = trainer.stopped_by or stop.should_stop(device)
            stop.restore()  # from here on (evaluation) signals act as usual
        log.close()  # every entry committed before evaluation
        t_train = time.time()
        if trainer.stopped_by is not None:
            why = stop.reason if stop is not None and stop.reason else \
                f"signal {trainer.stopped_by}"
            logger.info(f"[tcp] stopped ({why}) after step {trainer.step}; checkpoint "
                        f"{ckpts.root / step_name(trainer.step)}. Continue with resume=auto")
            end.status = "KILLED"
            return {"stopped_by": trainer.stopped_by, "step": trainer.step}
        logger.info(f"[tcp] joint training done in {t_train - t_base:.1f}s")
        results = finish(cfg, trainer=trainer, tokenizer=tokenizer, splits=splits,
                         val_samples=val_samples, budget=budget, out=out, device=device)
        results.update(
            data=data.results(),
            params={"pilot": n_p, "copilot": n_c},
            seconds={"base": t_base - t_start, "train": t_train - t_base,
                     "eval": time.time() - t_train, "checkpoint": trainer.checkpoint_s,
                     "total": time.time() - t_start},
            world_size=world,
            zero3_partitioned=partitioned,
            mistake_log=gather_log_metrics(log, world, backend=cfg.mistake_log.backend),
            checkpoint=str(ckpts.root / step_name(trainer.step)),
            resumed_from=str(resumed.path) if resumed else None,
            mlflow_run_id=tracker.run_id,
        )
        if rank == 0:  # with the data's over-long and unknown counts as metrics
            publish_results(results, out, tracker, step=trainer.step, t_start=t_start,
                            metrics=data.metrics())
        check_truncation(results)  # eval.strict: fails every rank alike, results written
        end.status = "FINISHED"
        return results
    except BaseException as e:
        end.record(e)
        raise
    finally:
        if watch is not None:
            watch.close()
        if stop is not None:
            stop.restore()
        try:
            if log is not None:
                log.close()
        except Exception:
            if end.status == "FINISHED":
                raise  # otherwise the original error is the one to see
        tap.remove()
        end.close(tracker)


def finish(cfg: RunConfig, *, trainer: Trainer, tokenizer: Any,
           splits: dict[str, list[dict[str, str]]], val_samples: list[Any], budget: Any,
           out: Path, device: torch.device) -> dict[str, Any]:
    """After training: evaluation (when enabled) and the final models in `out/final`."""
    pilot, copilot = trainer.pilot, trainer.copilot
    results: dict[str, Any] = {"seed": cfg.seed}
    if cfg.eval.enabled:
        results.update(evaluate_and_report(
            cfg, pilot=pilot, copilot=copilot, tap=trainer.tap, tokenizer=tokenizer,
            val_records=splits["validation"], test_records=splits["test"],
            val_samples=val_samples, rank=trainer.rank, world=trainer.world, device=device,
            budget=budget, predictions_path=out / "predictions.jsonl",
            train_golds=[r["answer"] for r in splits["train"]]))
    if cfg.pilot.lora.enabled:  # merged into a plain HF model, and the adapter beside it
        save_hf_lora(pilot.module, out / "final" / "pilot", out / "final" / "pilot_adapter")
    else:
        save_hf(pilot.module, out / "final" / "pilot")
    save_module(copilot.module, out / "final" / "copilot.pt")
    results["history"] = trainer.history.rows
    return results


def resume_from(info: CheckpointInfo, trainer: Trainer, ckpts: CheckpointManager,
                tracker: Tracker) -> None:
    """Resume from `info` (collective): load both engines and this rank's trainer state, check
    on every rank that the state fits this run (data position, Mistake Log configuration and
    cursor), and only then change the folder: remove newer checkpoints, truncate the log to the
    checkpoint's cursor. A resume that fails leaves every checkpoint and log byte in place."""
    state: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        state = ckpts.load(info, pilot=trainer.pilot, copilot=trainer.copilot)
        trainer.check_state_dict(state)
    except CheckpointError as e:
        error = e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        error = CheckpointError(f"cannot resume from {info.path} ({type(e).__name__}: {e}); "
                                "nothing was changed: resume with the run's original config "
                                "and data, or start a fresh run (resume unset)")
    raise_if_any(error)
    ckpts.prepare(info)  # the timeline continues from `info`: newer checkpoints go
    trainer.load_state_dict(state)
    cut = getattr(trainer.log, "truncated_entries", 0)
    old = flatten(info.manifest.get("config", {}))
    new = flatten(to_dict(trainer.cfg))
    changed = {k: (old.get(k), v) for k, v in new.items() if k != "resume" and old.get(k) != v}
    if trainer.rank == 0:
        logger.info(f"[tcp] resumed from {info.path} at step {trainer.step}"
                    + (f"; {cut} Mistake Log entries past its cursor were dropped (rank 0)"
                       if cut else ""))
        if changed:
            logger.info("[tcp] config changed since the checkpoint: " + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))
        tracker.tags({"tcp.resumed_from": str(info.path), "tcp.resumed_at_step": str(info.step)})


def gather_log_metrics(log: MistakeLog, world: int, *, backend: str) -> dict[str, Any]:
    """Every rank's writer/sampler counters (zarr backend), for results.json."""
    mine = log.metrics()
    ranks: list[Any] = [mine]
    if dist.is_initialized() and world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {"backend": backend, "ranks": ranks}


def zero3_partitioned(model: torch.nn.Module, world: int) -> bool:
    """True when every parameter is ZeRO-3 managed and each rank holds only its shard."""
    return world > 1 and all(
        hasattr(p, "ds_id") and p.ds_tensor.numel() <= -(-p.ds_numel // world)
        for p in model.parameters()
    )
