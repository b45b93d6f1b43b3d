"""One run: set up data and models, build both engines, train jointly, evaluate, save, report."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tcp.base_model import ensure_base_model
from tcp.budget import budget_for_pilot, check_truncation
from tcp.checkpoint import CheckpointInfo, CheckpointManager, step_name
from tcp.cli import elapsed, print_rank0
from tcp.config import RunConfig, render_deepspeed, resolve_epochs, to_dict
from tcp.data.collate import tokenize_records
from tcp.data.loaders import load_split
from tcp.data.tokenizer import build_char_tokenizer, token_id_differences
from tcp.engines import build_engine, init_distributed, save_hf, save_module
from tcp.eval_report import format_table, summary_metrics
from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.store import FORMAT, Schema, create_root
from tcp.models.copilot import Copilot, init_copilot_from
from tcp.models.pilot import (
    PilotTap,
    build_model,
    is_encoder_decoder,
    load_pretrained,
    use_fused_head,
)
from tcp.plots import save_plots
from tcp.preemption import StopSignal
from tcp.tracking import Tracker, flatten
from tcp.train import Trainer, evaluate_and_report, save_config, write_json


def load_tokenizer(cfg: RunConfig) -> Any:
    """The run's tokenizer: the character tokenizer for the embedded default, else the Pilot's."""
    if cfg.model.name_or_path is None and cfg.data.tokenizer is None:
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    name = cfg.data.tokenizer or cfg.model.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise RuntimeError(f"tokenizer {name!r} could not be loaded (offline or not a local "
                           "folder); point data.tokenizer at a local copy") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_pilot(cfg: RunConfig, tokenizer: Any, base: Path | None, world: int) -> torch.nn.Module:
    """The Pilot model before DeepSpeed wraps it: LoRA-wrapped (peft) when pilot.lora.enabled,
    with gradient checkpointing when pilot.gradient_checkpointing."""
    model: torch.nn.Module
    if cfg.model.name_or_path is not None:
        keep = None
        if cfg.train.pilot.zero.stage == 3:
            # Makes from_pretrained construct the model partitioned (zero.Init) so a 70B Pilot
            # never has to fit on one rank; must stay alive until the engine is built.
            from transformers.integrations import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(render_deepspeed(cfg, "pilot", world_size=world))
        model = load_pretrained(cfg.model.name_or_path, cfg.model)
        del keep
    elif base is not None and cfg.model.init_from_base:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base)
    else:
        model = build_model(cfg.model.arch, vocab_size=len(tokenizer),
                            pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                            eos_id=tokenizer.eos_token_id, seed=cfg.seed)
    if cfg.pilot.lora.enabled:
        from tcp.models.lora import apply_lora

        # Before the engine: its optimizer then holds the adapters only. A partitioned
        # (zero.Init) Pilot takes adapters too; the engine partitions the new parameters.
        model = apply_lora(model, cfg.pilot.lora)
    if cfg.pilot.gradient_checkpointing:
        from tcp.models.pilot import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model


def build_copilot(cfg: RunConfig, *, vocab: int, d_pilot: int, base: Path | None,
                  pilot_encoder_decoder: bool = False, tokenizer: Any = None) -> Copilot:
    """The Copilot, initialised from the base model / a pretrained LLaMA-style decoder or T5 /
    from scratch. `copilot.architecture=auto` makes it encoder-decoder when the Pilot is.
    With `tokenizer` (the run's), a source that ships another tokenizer is refused: its
    embedding rows would mean other tokens."""
    torch.manual_seed(cfg.seed + 1)
    arch = cfg.copilot.architecture
    encdec = arch == "encoder_decoder" or (arch == "auto" and pilot_encoder_decoder)
    cop = Copilot(cfg.copilot, vocab_size=vocab, pilot_hidden=d_pilot, encoder_decoder=encdec)
    src = {"base": base, "none": None}.get(cfg.copilot.init_from, cfg.copilot.init_from)
    if src is not None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        if tokenizer is not None:  # before any weight loads
            check_same_tokenizer(src, tokenizer)
        try:  # a T5 loads with its decoder (seq2seq), every other source as a causal LM
            seq2seq = AutoConfig.from_pretrained(src).is_encoder_decoder
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            source = auto.from_pretrained(src)
        except OSError as e:
            raise RuntimeError(f"copilot.init_from={str(src)!r} could not be loaded (not a "
                               "local model folder, or offline); point it at a local copy or "
                               "use copilot.init_from=none") from e
        copied = init_copilot_from(cop, source)
        del source  # only its weights were needed
        print_rank0(f"[tcp] Copilot initialised from {src} ({len(copied)} tensors copied)")
    return cop


def check_same_tokenizer(src: str | Path, tokenizer: Any) -> None:
    """Refuse a Copilot source whose own tokenizer maps tokens to other ids than the run's
    (padding rows beyond the vocabulary may differ; the tokens may not). No tokenizer beside
    the source: nothing to compare, the run's is assumed."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError):
        return
    diff = token_id_differences(theirs, tokenizer)
    if diff:
        raise RuntimeError(f"copilot.init_from={str(src)!r}: its tokenizer differs from the "
                           f"Pilot's in {diff} token ids ({len(theirs)} vs {len(tokenizer)} "
                           "tokens); "
                           "the Copilot must start from a same-family model (same tokenizer), "
                           "or use copilot.init_from=none")


def build_engines(cfg: RunConfig, tokenizer: Any, base: Path | None,
                  world: int) -> tuple[Any, Any, PilotTap]:
    """Both models wrapped in their DeepSpeed engines, and the Pilot's tap. Collective."""
    pilot_model = build_pilot(cfg, tokenizer, base, world)
    vocab, d_pilot = int(pilot_model.config.vocab_size), int(pilot_model.config.hidden_size)
    copilot_model = build_copilot(cfg, vocab=vocab, d_pilot=d_pilot, base=base,
                                  pilot_encoder_decoder=is_encoder_decoder(pilot_model),
                                  tokenizer=tokenizer)
    # Before DeepSpeed wraps it, so ZeRO-3 hooks the new head. Outside a request it is the
    # Linear it replaces; with kernels.fused=false it still lets evaluation and decoding compute
    # logits at the rows they need only. The fused loss cannot do without it.
    use_fused_head(pilot_model, required=cfg.kernels.fused)
    tap = PilotTap(pilot_model, impl=cfg.kernels.impl)  # hooks survive DeepSpeed wrapping
    pilot = build_engine(pilot_model, render_deepspeed(cfg, "pilot", world_size=world))
    copilot = build_engine(copilot_model, render_deepspeed(cfg, "copilot", world_size=world))
    return pilot, copilot, tap


def build_mistake_log(cfg: RunConfig, out: Path, *, rank: int, d_model: int,
                      vocab: int, resume: bool = False) -> MistakeLog:
    """The configured backend. A fresh run replaces a previous run's Zarr log at the same
    path (rank 0, announced); anything at that path that is not a Mistake Log is refused. A
    resumed run reopens the log (the trainer state then truncates it to the checkpoint)."""
    ml = cfg.mistake_log
    if ml.backend == "memory":
        assert ml.window_steps != "all"  # rejected by the config
        return MemoryMistakeLog(window_steps=ml.window_steps, seed=cfg.seed, rank=rank)
    root = Path(ml.store.path) if ml.store.path else out / "mistake_log"
    if rank == 0 and root.exists() and any(root.iterdir()):
        meta = root / "zarr.json"
        if not meta.exists() or f'"{FORMAT}"' not in meta.read_text():
            raise RuntimeError(f"{root} exists and is not a tcp Mistake Log; set "
                               "mistake_log.store.path to an empty or new directory")
        if not resume:
            print_rank0(f"[tcp] replacing the Mistake Log of a previous run at {root}")
            shutil.rmtree(root)
    elif resume and rank == 0:
        raise RuntimeError(f"resuming needs the run's Mistake Log, but {root} is missing or "
                           "empty; restore it, or start a fresh run (resume unset)")
    schema = Schema(d_model, min(ml.topk, vocab), ml.storage_dtype)
    if rank == 0:
        create_root(root, schema)  # one writer of the root metadata; ranks add their shards
    if dist.is_initialized():
        dist.barrier()
    return ZarrMistakeLog(root, rank=rank, cfg=ml.store, schema=schema,
                          window_steps=None if ml.window_steps == "all" else ml.window_steps,
                          replay_size=ml.replay_size, seed=cfg.seed)


def run(cfg: RunConfig) -> dict[str, Any]:
    """The main job. Collective: every rank calls it. Returns results; `results["stopped_by"]`
    is the signal number when SIGTERM/SIGINT stopped training (after a clean checkpoint)."""
    t_start = time.time()
    rank, world, device = init_distributed(timeout_s=cfg.train.collective_timeout_s)
    out = Path(cfg.output_dir)
    ckpts = CheckpointManager(cfg.checkpoint, out, rank=rank, world=world)
    resumed = ckpts.resolve(cfg.resume)  # a bad resume fails here, before any model loads
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    if rank == 0:
        save_config(cfg, out, world)
        tokenizer.save_pretrained(out / "tokenizer")

    splits = {s: load_split(cfg.data, s, seed=cfg.seed) for s in ("train", "validation", "test")}
    tok_kw = dict(max_length=cfg.data.max_length, overlength=cfg.data.overlength)
    train_samples, train_rep = tokenize_records(splits["train"], tokenizer, **tok_kw)
    val_samples, val_rep = tokenize_records(splits["validation"], tokenizer, **tok_kw)
    for name, rep in (("train", train_rep), ("validation", val_rep)):
        if rep.skipped_overlength or rep.truncated:
            print_rank0(f"[tcp] {name}: {rep.skipped_overlength} over-long samples skipped, "
                        f"{rep.truncated} truncated (data.max_length={cfg.data.max_length})")
    if not train_samples:
        raise RuntimeError("no training samples left after tokenisation; raise data.max_length")
    if cfg.train.epochs is not None:
        cfg = resolve_epochs(cfg, num_samples=len(train_samples), world_size=world)
        print_rank0(f"[tcp] train.epochs={cfg.train.epochs:g} over {len(train_samples)} samples "
                    f"= {cfg.train.steps} steps")
        if rank == 0:
            save_config(cfg, out, world)  # the resolved step count, for resume and reports

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
    print_rank0(f"[tcp] world={world} device={device.type}; Pilot {n_p / 1e6:.2f}M params, "
                f"Copilot {n_c / 1e6:.2f}M params; {len(train_samples)} train samples")
    # eval.max_new_tokens 'auto' is sized here, once, from the tokenized answers.
    budget = budget_for_pilot(cfg.eval, {"train": train_samples, "validation": val_samples},
                              tokenizer, pilot=pilot_model, max_length=cfg.data.max_length)
    if cfg.eval.enabled:
        print_rank0(f"[tcp] {budget.describe()}")

    tracker = Tracker(cfg, rank=rank,
                      run_id=resumed.manifest.get("mlflow_run_id") if resumed else None)
    ckpts.prepare(resumed)
    log = build_mistake_log(cfg, out, rank=rank, d_model=d_pilot, vocab=vocab,
                            resume=resumed is not None)
    stop = StopSignal().install() if cfg.checkpoint.on_signal else None
    trainer = Trainer(cfg, pilot=pilot, copilot=copilot, tap=tap, log=log,
                      samples=train_samples, pad_id=tokenizer.pad_token_id, rank=rank,
                      world=world, device=device, tracker=tracker, checkpoints=ckpts, stop=stop)
    status = "FAILED"
    try:
        if resumed is not None:
            resume_from(resumed, trainer, ckpts, tracker)
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
            print_rank0(f"[tcp] stopped by signal {trainer.stopped_by} after step "
                        f"{trainer.step}; checkpoint {ckpts.root / step_name(trainer.step)}. "
                        "Continue with resume=auto")
            status = "KILLED"
            return {"stopped_by": trainer.stopped_by, "step": trainer.step}
        print_rank0(f"[tcp] joint training done in {t_train - t_base:.1f}s")
        results: dict[str, Any] = {"seed": cfg.seed}
        if cfg.eval.enabled:
            results.update(evaluate_and_report(
                cfg, pilot=pilot, copilot=copilot, tap=tap, tokenizer=tokenizer,
                val_records=splits["validation"], test_records=splits["test"],
                val_samples=val_samples, rank=rank, world=world, device=device,
                budget=budget, predictions_path=out / "predictions.jsonl"))
        t_eval = time.time()
        if cfg.pilot.lora.enabled:  # merged into a plain HF model, and the adapter beside it
            from tcp.engines import save_hf_lora

            save_hf_lora(pilot.module, out / "final" / "pilot", out / "final" / "pilot_adapter")
        else:
            save_hf(pilot.module, out / "final" / "pilot")
        save_module(copilot.module, out / "final" / "copilot.pt")
        results.update(
            history=trainer.history.rows,
            data={"train": vars(train_rep) | {"skipped_ids": train_rep.skipped_ids[:20]},
                  "validation": vars(val_rep) | {"skipped_ids": val_rep.skipped_ids[:20]}},
            params={"pilot": n_p, "copilot": n_c},
            seconds={"base": t_base - t_start, "train": t_train - t_base,
                     "eval": t_eval - t_train, "checkpoint": trainer.checkpoint_s,
                     "total": time.time() - t_start},
            world_size=world,
            zero3_partitioned=partitioned,
            mistake_log=gather_log_metrics(log, world, backend=cfg.mistake_log.backend),
            checkpoint=str(ckpts.root / step_name(trainer.step)),
            resumed_from=str(resumed.path) if resumed else None,
            mlflow_run_id=tracker.run_id,
        )
        if rank == 0:
            write_json(out / "results.json", results)
            report(results, out, tracker, step=trainer.step)
            print(f"[tcp] results: {out / 'results.json'} (total {elapsed(t_start)})",
                  flush=True)
        check_truncation(results)  # eval.strict: fails every rank alike, results written
        status = "FINISHED"
        return results
    finally:
        if stop is not None:
            stop.restore()
        try:
            log.close()
        except Exception:
            if status == "FINISHED":
                raise  # otherwise the original error is the one to see
        tracker.close(status)
        tap.remove()
        if status != "FAILED" and dist.is_initialized():
            dist.barrier()  # never on failure: the other ranks may be gone


def resume_from(info: CheckpointInfo, trainer: Trainer, ckpts: CheckpointManager,
                tracker: Tracker) -> None:
    """Load both engines and this rank's trainer state from `info`; report config changes."""
    state = ckpts.load(info, pilot=trainer.pilot, copilot=trainer.copilot)
    trainer.load_state_dict(state)
    cut = getattr(trainer.log, "truncated_entries", 0)
    old = flatten(info.manifest.get("config", {}))
    new = flatten(to_dict(trainer.cfg))
    changed = {k: (old.get(k), v) for k, v in new.items() if k != "resume" and old.get(k) != v}
    if trainer.rank == 0:
        print(f"[tcp] resumed from {info.path} at step {trainer.step}"
              + (f"; {cut} Mistake Log entries past its cursor were dropped (rank 0)" if cut
                 else ""), flush=True)
        if changed:
            print("[tcp] config changed since the checkpoint: " + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())), flush=True)
        tracker.tags({"tcp.resumed_from": str(info.path), "tcp.resumed_at_step": str(info.step)})


def report(results: dict[str, Any], out: Path, tracker: Tracker, *, step: int) -> None:
    """Rank 0: the final metrics, results.json and plots to MLflow, and the printed table."""
    if "pilot" in results:
        v = results["validation"]
        final = summary_metrics(results)  # accuracies, λ, budget, truncated shares
        # METHOD.md §6 diagnostics; fixes/breaks per λ become e.g. val/fixes.lambda_0.5
        final.update({f"val/{k.replace('.', '.lambda_', 1) if '.' in k else k}": float(x)
                      for k, x in flatten(v["teacher_forced"]).items()
                      if isinstance(x, int | float)})
        tracker.metrics(final, step=step)
        for s in v["sweep"]:
            tracker.metrics({"val_accuracy_pilot_copilot_by_lambda": s["accuracy"]},
                            step=round(s["lambda"] * 1000))
        print(format_table(results), flush=True)
    tracker.artifact(out / "results.json")
    for png in save_plots(results, out / "plots"):
        tracker.artifact(png, "plots")


def gather_log_metrics(log: MistakeLog, world: int, *, backend: str) -> dict[str, Any]:
    """Every rank's writer/sampler counters (zarr backend), for results.json."""
    mine = log.metrics()
    ranks: list[Any] = [mine]
    if dist.is_initialized() and world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    return {"backend": backend, "ranks": ranks}


def param_count(model: torch.nn.Module) -> int:
    """Full parameter count, also when ZeRO-3 has left each rank only a shard."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def zero3_partitioned(model: torch.nn.Module, world: int) -> bool:
    """True when every parameter is ZeRO-3 managed and each rank holds only its shard."""
    return world > 1 and all(
        hasattr(p, "ds_id") and p.ds_tensor.numel() <= -(-p.ds_numel // world)
        for p in model.parameters()
    )
