"""The source of an offline Copilot run (`tcp-train --offline-from <run>`,
tcp.training.offline_job): the run's recorded config with the overrides, and every check on the
finished run and its Mistake Log, done before any model loads so that bad input is one line and
exit 2.

What the offline run may change: the Copilot (`copilot.*`, another size or architecture), its
engine (`train.copilot.*`), `train.steps`/`train.copilot_start_step` (within the recorded steps),
the replay (`mistake_log.replay_size`, `window_steps`, `include_current`, the sampler's
`mistake_log.store.*` options), `offline.seed`, `eval.*`, `data.*` (evaluation data, as
tcp-eval), `tracking.*`, `kernels.*`, `base.cache_dir`. What it may not: the Pilot (`model.*`,
`pilot.*`, `base.*`) and `seed` (it also generates the embedded task's data): the source's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tcp.config import ConfigError, RunConfig, apply_overrides, from_dict, parse_override
from tcp.errors import RunError
from tcp.mistake_log.format import Manifest, MistakeLogCorrupt, Schema, rank_group, ranks_in
from tcp.runtime.process_group import slurm_env
from tcp.runtime.run_folder import log_root
from tcp.runtime.run_lock import check_not_in_use
from tcp.training.base_phase import base_dir, find_base_model

FIXED_KEYS = ("seed", "model", "pilot", "base")
"""Override prefixes an offline run refuses: they describe the source run's Pilot and data."""


class OfflineError(RunError):
    """The source run or its Mistake Log cannot train a Copilot offline; the message says why."""
    kind = "offline"


def offline_config(source: Path, overrides: list[str]) -> RunConfig:
    """The source run's resolved config.yaml with `overrides` applied and `offline.source` set.
    Raises ConfigError (one line) for a folder that is not a run, an override of the source's
    Pilot or seed, a missing `output_dir`, or an `output_dir` that is the source itself."""
    path = source / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--offline-from {source}: not a tcp run directory (no config.yaml); "
                          "pass the output_dir of a finished run")
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if key.split(".")[0] in FIXED_KEYS and key != "base.cache_dir":
            raise ConfigError(f"{key}: an offline run keeps the source run's Pilot, base model "
                              "and seed (the seed also generates the embedded task's data); "
                              "set offline.seed to vary the Copilot's initialisation and replay "
                              "draws")
        if key == "resume":
            raise ConfigError("resume: offline Copilot training does not checkpoint or resume; "
                              "start it again (it reads no Pilot, so it is the cheap part)")
    data = yaml.safe_load(path.read_text())
    data.pop("output_dir", None)
    data["resume"] = None
    data = apply_overrides(data, overrides)
    out = data.get("output_dir")
    if not out:
        raise ConfigError(f"--offline-from {source}: give the offline run its own folder, "
                          "e.g. output_dir=runs/offline")
    if Path(out).resolve() == source.resolve():
        raise ConfigError(f"output_dir={out} is the source run; the offline run needs a folder "
                          "of its own (the source's final models and log stay untouched)")
    data.setdefault("offline", {})["source"] = str(source.resolve())
    return from_dict(RunConfig, data)


@dataclass
class SourceRun:
    """A finished run checked for offline training (see `open_source`)."""
    path: Path
    log: Path
    """Its Mistake Log (one shard per rank of the offline job)."""
    pilot_dir: Path
    """Its final Pilot (HF folder): evaluates the offline Copilot."""
    tokenizer: Any
    """Its tokenizer (the offline run saves a copy)."""
    vocab: int
    d_pilot: int
    encoder_decoder: bool
    steps: range
    """The recorded steps the offline Copilot trains on, in order."""
    base: Path | None = None
    """The source's base model, for copilot.init_from=base."""
    joint_copilot_rmse: float | None = None
    """The jointly trained Copilot's validation RMSE (the source's results.json), to compare."""
    notes: list[str] = field(default_factory=list)
    """Lines to print once (rank 0)."""

def source_log(cfg: RunConfig) -> Path:
    """The Mistake Log an offline run reads: `offline.log_path`, else the source run's own."""
    assert cfg.offline.source is not None
    if cfg.offline.log_path:
        return Path(cfg.offline.log_path)
    src = Path(cfg.offline.source)
    recorded = yaml.safe_load((src / "config.yaml").read_text())
    recorded["output_dir"] = str(src)
    recorded["resume"] = None
    root = log_root(from_dict(RunConfig, recorded))
    if root is None:
        raise OfflineError(f"{src} kept no Mistake Log (mistake_log.backend=memory): train the "
                           "source with the zarr backend, or point offline.log_path at a log")
    return root


def open_source(cfg: RunConfig, *, world: int) -> SourceRun:
    """Check the source run and its log for an offline job of `world` ranks (rank r reads shard
    r): a finished run, a log that no live job holds, one shard per rank, readable manifests
    that agree on the steps, the Pilot's width and top-k, the steps to train. Raises
    OfflineError (or LockError) saying what to do; reads manifests only. The checks on the
    folders and the log come first and need no transformers (a wrong world size fails in a
    second)."""
    src = Path(cfg.offline.source or "")
    pilot_dir = src / "final" / "pilot"
    if not (pilot_dir / "config.json").is_file() or not (src / "tokenizer").is_dir():
        raise OfflineError(f"{src} is not a finished tcp run (no final/pilot or tokenizer); "
                           "finish it first (resume=auto), then train offline from it")
    root = source_log(cfg)
    if not (root / "zarr.json").is_file():
        raise OfflineError(f"{root}: no Mistake Log there (no zarr.json); point "
                           "offline.log_path at the source run's log")
    for folder in (src, root):
        check_not_in_use(folder, why="wait for it to finish, then train offline from its log")
    verify = f"check it with `tcp-log verify {root}`"
    shards = ranks_in(root)
    if shards != list(range(len(shards))) or not shards:
        raise OfflineError(f"{root}: rank shards {shards} are not 0..N-1; {verify}")
    if len(shards) != world:
        raise OfflineError(f"{root} has {len(shards)} rank shard(s) and this job {world} "
                           f"rank(s); rank r trains on shard r: run with {len(shards)} ranks "
                           f"(deepspeed --num_gpus {len(shards)}), or merge the log into 1 "
                           f"shard (`tcp-log compact {root} --merge-ranks`, in place; on a copy, "
                           "point offline.log_path at it) and train with 1 rank")
    try:
        schema = Schema.from_attrs(json.loads((root / "zarr.json").read_text())["attributes"],
                                   root)
        mans = [Manifest.read(root / rank_group(r) / "manifest.json") for r in shards]
    except (OSError, ValueError, KeyError, MistakeLogCorrupt) as e:
        raise OfflineError(f"{root}: unreadable ({type(e).__name__}: {e}); {verify}") from None
    spans = {(m.first_step, m.last_step) for m in mans}
    if len(spans) != 1 or None in next(iter(spans)):
        raise OfflineError(f"{root}: the shards hold different or no steps "
                           f"({sorted(spans, key=str)}); {verify}")
    first, last = next(iter(spans))
    assert first is not None and last is not None  # checked just above
    # heavy: transformers loads only where a model is built
    from transformers import AutoConfig, AutoTokenizer

    pc = AutoConfig.from_pretrained(pilot_dir)
    vocab, d_pilot = int(pc.vocab_size), int(pc.hidden_size)
    if schema.d_model != d_pilot:
        raise OfflineError(f"{root} records states of width {schema.d_model}, the Pilot at "
                           f"{pilot_dir} has {d_pilot}: the log is not this run's")
    k = min(cfg.mistake_log.topk, vocab)
    if schema.topk != k:
        raise OfflineError(f"{root} stores the top-{schema.topk} of p_hat; set "
                           f"mistake_log.topk={schema.topk} (it was {cfg.mistake_log.topk})")
    steps = recorded_steps(first=first, last=last, start=cfg.train.copilot_start_step,
                           stop=cfg.train.total_steps)
    tokenizer = AutoTokenizer.from_pretrained(src / "tokenizer")
    run = SourceRun(path=src, log=root, pilot_dir=pilot_dir, tokenizer=tokenizer, vocab=vocab,
                    d_pilot=d_pilot,
                    encoder_decoder=bool(getattr(pc, "is_encoder_decoder", False)), steps=steps,
                    joint_copilot_rmse=_joint_rmse(src))
    dropped = sum(m.dropped_entries for m in mans)
    if dropped:
        run.notes.append(f"[tcp] {root}: {dropped} entries were dropped by the joint run's "
                         "writer (mistake_log.store.on_full=drop); the stream differs there")
    if cfg.copilot.init_from == "base":
        run.base = _base_model(cfg, src, tokenizer)
    return run


def launched_world_size(env: Mapping[str, str]) -> int:
    """The world size the launcher announced, before any process group exists (deepspeed,
    torchrun, srun one task per rank, mpirun); 1 for a plain `python launcher/train.py`."""

    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if key in env:
            return int(env[key])
    return int(slurm_env(env).get("WORLD_SIZE", "1"))


def offline_seed(cfg: RunConfig) -> int:
    """The seed of the offline Copilot's initialisation and replay draws (`offline.seed`)."""
    return cfg.seed if cfg.offline.seed is None else cfg.offline.seed


def recorded_steps(*, first: int, last: int, start: int, stop: int) -> range:
    """The steps an offline Copilot trains on: from `train.copilot_start_step` (`start`), or
    the log's first step when it was pruned past it, up to `train.steps` +
    `train.copilot_tail_steps` (`stop`, exclusive), which the log must hold (it holds steps
    `first`..`last`)."""
    if stop - 1 > last:
        raise OfflineError(f"train.steps + train.copilot_tail_steps = {stop} needs steps up "
                           f"to {stop - 1}, the log holds {first}..{last}; set their sum "
                           f"<= {last + 1}")
    lo = max(start, first)
    if lo >= stop:
        raise OfflineError(f"no steps to train on: the log holds {first}..{last}, "
                           f"train.copilot_start_step={start}, train.steps + "
                           f"train.copilot_tail_steps = {stop}")
    return range(lo, stop)


def _base_model(cfg: RunConfig, src: Path, tokenizer: Any) -> Path:
    """The base model the source run started from (cached or shipped, by content key)."""
    path = find_base_model(cfg, tokenizer)
    if path is None:
        raise OfflineError(f"copilot.init_from=base: the base model of {src} is not at "
                           f"{base_dir(cfg, tokenizer)}; point base.cache_dir at the folder "
                           "that holds it (runs from before tcp's user cache kept it in "
                           "<output_dir>/../base-cache), or use copilot.init_from=none (or a "
                           "model folder)")
    return path


def _joint_rmse(src: Path) -> float | None:
    try:
        res = json.loads((src / "results.json").read_text())
        return float(res["validation"]["teacher_forced"]["copilot_rmse"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
