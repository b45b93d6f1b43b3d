"""The base-model phase of the embedded default (METHOD.md §7, issue "default regime").

The paper fine-tunes pretrained Pilots and initialises Copilots from pretrained same-family
decoders. Nothing can be downloaded here, so the default first pre-trains a small LLaMA on a broad
generated corpus (plain equations, word problems in phrasings no task uses, and with
`base.formats` the equations as multiple-choice and yes/no questions), caches it by content hash,
fine-tunes the Pilot from it and copies its blocks into the Copilot.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tcp.config import RunConfig, render_deepspeed, to_dict
from tcp.data import arithmetic
from tcp.data.collate import batch_indices, collate, tokenize_records
from tcp.models.pilot import build_llama
from tcp.runtime.console import Progress
from tcp.training.engines import build_engine, save_hf


def base_dir(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Cache folder of the base model this config needs (content-addressed)."""
    # The task's data.max_length is not part of it: the corpus is cut at the model's context
    # (`corpus_max_length`), so tasks with the same `base.*` settings share one base model.
    key = json.dumps({"arch": to_dict(cfg.model.arch),
                      "base": {k: v for k, v in to_dict(cfg.base).items() if k != "cache_dir"},
                      "vocab": tokenizer.get_vocab()},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cfg.base.cache_dir) if cfg.base.cache_dir else Path(cfg.output_dir).parent / \
        "base-cache"
    return root / digest


def corpus_max_length(cfg: RunConfig) -> int:
    """Longest base-corpus sample kept, in tokens: the model's context."""
    return cfg.model.arch.max_position_embeddings


def ensure_base_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int,
                      world: int, device: torch.device) -> Path:
    """Return the base model's folder, pre-training it first unless it is cached."""
    path = base_dir(cfg, tokenizer)
    if (path / "config.json").exists():
        if rank == 0:
            print(f"[tcp] base model: reusing {path}", flush=True)
        return path
    b = cfg.base
    records = arithmetic.generate(b.seed, "base", b.corpus_size, base_formats=tuple(b.formats))
    samples, report = tokenize_records(records, tokenizer, max_length=corpus_max_length(cfg),
                                       overlength="skip")
    model = build_llama(cfg.model.arch, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, seed=b.seed)
    engine = build_engine(model, render_deepspeed(cfg, "base", world_size=world))
    bar = Progress(total=b.steps, desc="base", enabled=rank == 0)
    t0, tokens = time.time(), 0
    for step in range(b.steps):
        idx = batch_indices(seed=b.seed, step=step, rank=rank, world_size=world,
                            micro_batch_size=b.micro_batch_size, num_samples=len(samples))
        batch = collate([samples[i] for i in idx], tokenizer.pad_token_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        # Plain language modelling on every real token (prompt and answer).
        labels = ids.masked_fill(mask == 0, -100)
        out = engine(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        engine.backward(out.loss)
        engine.step()
        tokens += int(mask.sum()) * world
        if step % 10 == 0 or step == b.steps - 1:
            bar.update(step + 1, loss=f"{out.loss.item():.3f}",
                       tok_s=f"{tokens / (time.time() - t0):.0f}")
    bar.close()
    if rank == 0:
        print(f"[tcp] base model: {b.steps} steps on {report.kept} samples "
              f"({report.skipped_overlength} over-long skipped), final loss "
              f"{out.loss.item():.3f}; saved to {path}", flush=True)
    save_hf(engine.module, path)
    engine.destroy()
    return path
