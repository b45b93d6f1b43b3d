"""`RunConfig`, the whole run (the top-level keys `seed`, `output_dir`, `resume`, one field per
section, and the checks that span sections), and how it is read: YAML files with `extends`,
dotted overrides, `load_config`, `dump_yaml`, and `resolve_epochs` once the data is known."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tcp.config.data import BUILTIN, DataConfig
from tcp.config.eval import EvalConfig
from tcp.config.mistake_log import MistakeLogConfig
from tcp.config.models import BaseConfig, CopilotConfig, ModelConfig, PilotConfig
from tcp.config.offline import OfflineConfig
from tcp.config.schema import ConfigError, _check, from_dict, to_dict
from tcp.config.train import CheckpointConfig, KernelsConfig, TrackingConfig, TrainConfig


@dataclass
class RunConfig:
    """A whole run."""

    seed: int = 0
    """Seeds data generation order, initialisation and sampling."""
    output_dir: str = "runs/default"
    """Run directory: resolved config, tokenizer, checkpoints, results.json."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Pilot."""
    pilot: PilotConfig = field(default_factory=PilotConfig)
    """How the Pilot is fine-tuned: LoRA, gradient checkpointing."""
    base: BaseConfig = field(default_factory=BaseConfig)
    """The base-model phase (embedded default)."""
    copilot: CopilotConfig = field(default_factory=CopilotConfig)
    """The Copilot."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    mistake_log: MistakeLogConfig = field(default_factory=MistakeLogConfig)
    """The Mistake Log."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The joint loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    """Fused kernels."""
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    """Offline Copilot training from a finished run's Mistake Log (unset: joint training)."""
    resume: str | None = None
    """None: a fresh run (a previous run's checkpoints and Mistake Log in the same place are
    replaced). 'auto': continue from the latest complete checkpoint if there is one, else
    start fresh. A path: that checkpoint (a `step_*` folder, or a checkpoint directory whose
    `latest` is used)."""

    def __post_init__(self) -> None:
        # Cross-section checks; keys are given in full because they span sections.
        if self.model.name_or_path is None and self.model.arch.family == "t5":
            _check(not self.base.enabled, "base.enabled",
                   "the base phase pre-trains a LLaMA; with model.arch.family=t5 set "
                   "base.enabled=false (and copilot.init_from=none)")
        if self.copilot.init_from == "base":
            _check(
                self.model.name_or_path is None and self.base.enabled,
                "copilot.init_from",
                "'base' needs the base phase (model.name_or_path unset, base.enabled=true); "
                "use copilot.init_from=none or a path to a pretrained decoder",
            )
            _check(
                self.copilot.hidden_size == self.model.arch.hidden_size
                and self.copilot.num_layers <= self.model.arch.num_layers
                and self.copilot.num_heads == self.model.arch.num_heads
                and self.copilot.intermediate_size == self.model.arch.intermediate_size,
                "copilot",
                "init_from=base copies base blocks, so hidden_size, num_heads and "
                "intermediate_size must equal model.arch's and num_layers <= model.arch.num_layers",
            )
        if self.data.source in BUILTIN and self.model.name_or_path is None:
            _check(
                self.data.tokenizer is None,
                "data.tokenizer",
                "the embedded default builds its own character tokenizer; unset data.tokenizer",
            )


# ----------------------------------------------------------------------------------------------
# Reading: YAML files (with `extends`) and dotted overrides -> a validated RunConfig.


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` (value read as YAML: numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.pilot.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), _yaml_floats(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with dotted overrides applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path)}: '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml_floats(data: Any) -> Any:
    """PyYAML (YAML 1.1) reads `3e-4` as a string; turn such strings into the floats users mean."""
    if isinstance(data, dict):
        return {k: _yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_yaml_floats(v) for v in data]
    if isinstance(data, str) and _SCI.match(data.strip()):
        return float(data)
    return data


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One config file as a dict; `extends: other.yaml` (relative to the file) is read first
    and this file's values are merged over it, section by section."""
    if not p.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"--config: file not found: {p}{where}")
    if p.resolve() in chain:
        raise ConfigError(f"--config {p}: `extends` loops back to itself")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--config {p}: top level must be a mapping of sections")
    data = _yaml_floats(loaded or {})
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"--config {p}: extends must be a file path, e.g. extends: default.yaml")
    return _merge(_read_yaml(p.parent / parent, (*chain, p.resolve())), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved with every run)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def resolve_epochs(cfg: RunConfig, *, num_samples: int, world_size: int) -> RunConfig:
    """`cfg` with `train.steps` derived from `train.epochs` (unchanged when epochs is None):
    one step consumes `pilot.micro_batch_size` samples on each of `world_size` ranks."""
    if cfg.train.epochs is None:
        return cfg
    per_step = cfg.train.pilot.micro_batch_size * world_size
    steps = max(1, math.ceil(cfg.train.epochs * num_samples / per_step))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
