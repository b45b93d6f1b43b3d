"""What a run folder holds besides checkpoints and the log, written by rank 0: the resolved config
(`config.yaml`), both DeepSpeed configs (`deepspeed.json`), the tokenizer; all through the durable
write of `tcp.runtime.atomic`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tcp.config import RunConfig, dump_yaml, render_deepspeed
from tcp.runtime.atomic import atomic_write, atomic_write_json


def ds_configs(cfg: RunConfig, world: int) -> dict[str, dict[str, Any]]:
    """Both engines' DeepSpeed configs."""
    return {"pilot": render_deepspeed(cfg, "pilot", world_size=world),
            "copilot": render_deepspeed(cfg, "copilot", world_size=world)}


def save_config(cfg: RunConfig, out: Path, world: int) -> None:
    """Resolved config and rendered DeepSpeed configs into the run directory (rank 0)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", dump_yaml(cfg))
    write_json(out / "deepspeed.json", ds_configs(cfg, world))


def save_run_files(cfg: RunConfig, out: Path, world: int, tokenizer: Any) -> None:
    """Rank 0: the resolved config, both DeepSpeed configs and the tokenizer in `out`."""
    save_config(cfg, out, world)
    tokenizer.save_pretrained(out / "tokenizer")


def write_json(path: Path, obj: Any) -> None:
    """A run's JSON file (results.json, deepspeed.json), indented for reading, written durably
    (tcp.runtime.atomic)."""
    atomic_write_json(path, obj, indent=2)


