"""Build a run's parts: the tokenizer, the Pilot (LoRA, gradient checkpointing), the Copilot
(initialised from a same-family model), both DeepSpeed engines, and the Mistake Log."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch

from tcp.config import RunConfig, render_deepspeed
from tcp.data.tokenizer import build_char_tokenizer, token_id_differences
from tcp.errors import RunError
from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.format import FORMAT, Schema, create_root
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.models.copilot import Copilot
from tcp.models.copilot_init import init_copilot_from
from tcp.models.lm_head import use_fused_head
from tcp.models.lora import apply_lora
from tcp.models.pilot import (
    PilotTap,
    build_model,
    enable_gradient_checkpointing,
    is_encoder_decoder,
    load_pretrained,
)
from tcp.runtime.collective import raise_if_any
from tcp.runtime.console import logger
from tcp.runtime.quiet import hf_progress_off
from tcp.runtime.run_folder import log_root
from tcp.runtime.run_lock import LOCK_NAME
from tcp.training.checkpoint_layout import CheckpointError
from tcp.training.engines import build_engine


def load_tokenizer(cfg: RunConfig) -> Any:
    """The run's tokenizer: the character tokenizer for the embedded default, else the Pilot's."""
    if cfg.model.name_or_path is None and cfg.data.tokenizer is None:
        return build_char_tokenizer()
    from transformers import AutoTokenizer  # heavy: transformers loads only where a model is built

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
        # heavy: transformers loads only where a model is built
        from transformers import AutoModelForCausalLM

        with hf_progress_off():  # a local folder tcp wrote: no "Loading weights" bar per rank
            model = AutoModelForCausalLM.from_pretrained(base)
    else:
        model = build_model(cfg.model.arch, vocab_size=len(tokenizer),
                            pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                            eos_id=tokenizer.eos_token_id, seed=cfg.seed)
    if cfg.pilot.lora.enabled:
        # Before the engine: its optimizer then holds the adapters only. A partitioned
        # (zero.Init) Pilot takes adapters too; the engine partitions the new parameters.
        model = apply_lora(model, cfg.pilot.lora)
    if cfg.pilot.gradient_checkpointing:
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
        # heavy: transformers loads only where a model is built
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        if tokenizer is not None:  # before any weight loads
            check_same_tokenizer(src, tokenizer)
        try:  # a T5 loads with its decoder (seq2seq), every other source as a causal LM
            seq2seq = AutoConfig.from_pretrained(src).is_encoder_decoder
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            # A local folder loads without a progress bar per rank; a download keeps its bars.
            with hf_progress_off() if Path(src).is_dir() else contextlib.nullcontext():
                source = auto.from_pretrained(src)
        except OSError as e:
            raise RuntimeError(f"copilot.init_from={str(src)!r} could not be loaded (not a "
                               "local model folder, or offline); point it at a local copy or "
                               "use copilot.init_from=none") from e
        copied = init_copilot_from(cop, source)
        del source  # only its weights were needed
        logger.info(f"[tcp] Copilot initialised from {src} ({len(copied)} tensors copied)")
    return cop


def check_same_tokenizer(src: str | Path, tokenizer: Any) -> None:
    """Refuse a Copilot source whose own tokenizer maps tokens to other ids than the run's
    (padding rows beyond the vocabulary may differ; the tokens may not). No tokenizer beside
    the source: nothing to compare, the run's is assumed."""
    from transformers import AutoTokenizer  # heavy: transformers loads only where a model is built

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
    """The configured backend (collective). A fresh run replaces a previous run's Zarr log at
    the same path (rank 0, announced); anything at that path that is not a Mistake Log is
    refused. A resumed run reopens the log, unchanged (the trainer state then truncates it to
    the checkpoint once the resume has been checked). Failures raise RunError on every rank."""
    ml = cfg.mistake_log
    if ml.backend == "memory":
        assert ml.window_steps != "all"  # rejected by the config
        return MemoryMistakeLog(window_steps=ml.window_steps, seed=cfg.seed, rank=rank)
    root = log_root(cfg)
    assert root is not None
    schema = Schema(d_model, min(ml.topk, vocab), ml.storage_dtype)
    error: BaseException | None = None
    if rank == 0:
        try:
            prepare_log_root(root, schema, resume=resume)
        except (OSError, ValueError, RuntimeError) as e:
            error = e
    raise_if_any(error)  # also the barrier: the root exists before the ranks add their shards
    log: MistakeLog | None = None
    error = None
    try:
        log = ZarrMistakeLog(root, rank=rank, cfg=ml.store, schema=schema,
                             window_steps=None if ml.window_steps == "all" else ml.window_steps,
                             replay_size=ml.replay_size, seed=cfg.seed)
    except (OSError, ValueError, RuntimeError) as e:
        error = e
    raise_if_any(error)
    assert log is not None
    return log


def prepare_log_root(root: Path, schema: Schema, *, resume: bool) -> None:
    """Rank 0: check what is at `root`, clear a previous run's log for a fresh run (keeping
    the run's lock), create the root group. Raises RunError saying what to change."""
    found = [p for p in root.iterdir() if not p.name.startswith(LOCK_NAME)] \
        if root.is_dir() else []
    if found:
        meta = root / "zarr.json"
        if not meta.exists() or f'"{FORMAT}"' not in meta.read_text():
            raise RunError(f"{root} exists and is not a tcp Mistake Log; set "
                           "mistake_log.store.path to an empty or new directory")
        if not resume:
            logger.info(f"[tcp] replacing the Mistake Log of a previous run at {root}")
            for p in found:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif resume:
        raise CheckpointError(f"resuming needs the run's Mistake Log, but {root} is missing or "
                              "empty; restore it, or start a fresh run (resume unset)")
    create_root(root, schema)  # one writer of the root metadata; ranks add their shards
