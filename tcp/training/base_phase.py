"""The base-model phase of the embedded default (docs/method.md §5.6).

The paper fine-tunes pretrained Pilots and initialises Copilots from pretrained same-family
decoders. Nothing can be downloaded here, so the default first pre-trains a small LLaMA on a broad
generated corpus (plain equations, word problems in phrasings no task uses, and with
`base.formats` the equations as multiple-choice and yes/no questions), caches it by content key,
fine-tunes the Pilot from it and copies its blocks into the Copilot. The default's base model
ships with tcp (`SHIPPED`), so a fresh clone of the default skips the phase.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from tcp.config import RunConfig, render_deepspeed, to_dict
from tcp.data import arithmetic
from tcp.data.collate import batch_indices, collate, tokenize_records
from tcp.errors import RunError
from tcp.models.pilot import build_llama
from tcp.runtime.collective import distributed, raise_if_any
from tcp.runtime.console import Progress, logger
from tcp.runtime.shared_storage import VISIBILITY_WAIT_S, wait_visible
from tcp.runtime.user_cache import cache_root
from tcp.training.engines import build_engine, save_hf

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "base"
"""Base models that ship with tcp, one folder per content key (`base_key`): the embedded
default's, so a fresh clone fine-tunes at once. Regenerate with `tools/ship_base.py`."""


def base_key(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Content key of the base model this config needs: its architecture, `base.*` settings
    (less `cache_dir`) and the tokenizer's vocabulary."""
    # The task's data.max_length is not part of it: the corpus is cut at the model's context
    # (`corpus_max_length`), so tasks with the same `base.*` settings share one base model.
    key = json.dumps({"arch": to_dict(cfg.model.arch),
                      "base": {k: v for k, v in to_dict(cfg.base).items() if k != "cache_dir"},
                      "vocab": tokenizer.get_vocab()},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def base_dir(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Cache folder of the base model this config needs (written by the base phase):
    `base.cache_dir`, else `<tcp cache>/base` (tcp.runtime.user_cache), then the key."""
    root = Path(cfg.base.cache_dir) if cfg.base.cache_dir else cache_root() / "base"
    return root / base_key(cfg, tokenizer)


def find_base_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> Path | None:
    """The base model's folder if it ships with tcp or is cached, else None. The shipped one
    wins, so every clone of a built-in config starts from the same weights, even where this
    machine once pre-trained a model of the same key."""
    for path in (SHIPPED / base_key(cfg, tokenizer), base_dir(cfg, tokenizer)):
        if (path / "config.json").is_file():
            return path
    return None


def corpus_max_length(cfg: RunConfig) -> int:
    """Longest base-corpus sample kept, in tokens: the model's context."""
    return cfg.model.arch.max_position_embeddings


def ensure_base_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int,
                      world: int, device: torch.device) -> Path:
    """Return the base model's folder: the shipped or cached one, else one pre-trained now
    and saved to the cache (`base_dir`). Collective."""
    found = find_base_model(cfg, tokenizer)
    _check_same_on_every_rank(found, base_dir(cfg, tokenizer))
    if found is not None:
        if rank == 0:
            how = "shipped with tcp" if found.parent == SHIPPED else "cached"
            logger.info(f"[tcp] base model: {how}, {found}")
        return found
    path = base_dir(cfg, tokenizer)
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
        logger.info(f"[tcp] base model: {b.steps} steps on {report.kept} samples "
                    f"({report.skipped_overlength} over-long skipped), final loss "
                    f"{out.loss.item():.3f}; saved to {path}")
    save_hf(engine.module, path)
    engine.destroy()
    missing = wait_visible([path / "config.json"], VISIBILITY_WAIT_S)
    raise_if_any(RunError(f"the base model rank 0 saved is not visible at {path} on this "
                          f"rank's node: {_SHARE_FIX}") if missing else None)
    return path


_SHARE_FIX = ("set TCP_CACHE_DIR (or base.cache_dir) to a folder every node sees, e.g. on the "
              "storage that holds output_dir")


def _check_same_on_every_rank(found: Path | None, path: Path) -> None:
    """Collective: every rank found the base model, or none did (a cache on one node's local
    disk would otherwise send some ranks into the base phase and leave the others waiting)."""
    if not distributed():
        return
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, found is not None)
    if all(seen) or not any(seen):
        return
    missing = [r for r, ok in enumerate(seen) if not ok]
    raise RunError(f"the base model {path.name} is cached for some ranks but not for "
                   f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                   f"({path.parent}): {_SHARE_FIX}")
