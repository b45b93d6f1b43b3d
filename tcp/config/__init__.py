"""Run configuration: nested dataclasses, YAML loading, dotted overrides, DeepSpeed rendering.

Every value is validated here, before any model or data is touched, so a typo in a YAML file or
on the command line fails in a second with a message naming the key and the fix, not after a
model has been loaded onto 64 GPUs.

Each key is documented (a docstring under the field) in the file of its section:

    YAML section          file                      dataclass
    --------------------  ------------------------  ------------------
    model                 tcp/config/models.py      ModelConfig
    model.arch            tcp/config/models.py      ArchConfig
    pilot                 tcp/config/models.py      PilotConfig
    pilot.lora            tcp/config/models.py      LoraConfig
    base                  tcp/config/models.py      BaseConfig
    copilot               tcp/config/models.py      CopilotConfig
    data                  tcp/config/data.py        DataConfig
    mistake_log           tcp/config/mistake_log.py MistakeLogConfig
    mistake_log.store     tcp/config/mistake_log.py ZarrStoreConfig
    train                 tcp/config/train.py       TrainConfig
    train.pilot           tcp/config/engine.py      EngineConfig
    train.pilot.zero      tcp/config/engine.py      ZeroConfig
    train.copilot         tcp/config/engine.py      EngineConfig
    train.copilot.zero    tcp/config/engine.py      ZeroConfig
    eval                  tcp/config/eval.py        EvalConfig
    tracking              tcp/config/train.py       TrackingConfig
    checkpoint            tcp/config/train.py       CheckpointConfig
    kernels               tcp/config/train.py       KernelsConfig
    offline               tcp/config/offline.py     OfflineConfig

The top-level keys (seed, output_dir, resume) and the checks that span sections are on
RunConfig in tcp/config/run.py, which also reads YAML files (`extends`), applies dotted overrides
(`train.pilot.lr=3e-4`) and holds load_config, dump_yaml and resolve_epochs. The DeepSpeed config
of each engine is rendered in tcp/config/deepspeed.py (render_deepspeed); ConfigError and the
dict -> dataclass conversion with its type checks (from_dict, to_dict) are in
tcp/config/schema.py. Import everything from `tcp.config`.
"""

from tcp.config.data import DataConfig
from tcp.config.deepspeed import engine_config, render_deepspeed
from tcp.config.engine import EngineConfig, ZeroConfig
from tcp.config.eval import EvalConfig
from tcp.config.mistake_log import MistakeLogConfig, ZarrStoreConfig
from tcp.config.models import (
    ArchConfig,
    BaseConfig,
    CopilotConfig,
    LoraConfig,
    ModelConfig,
    PilotConfig,
)
from tcp.config.offline import OfflineConfig
from tcp.config.run import (
    RunConfig,
    apply_overrides,
    dump_yaml,
    load_config,
    parse_override,
    resolve_epochs,
)
from tcp.config.schema import ConfigError, from_dict, to_dict
from tcp.config.train import CheckpointConfig, KernelsConfig, TrackingConfig, TrainConfig

__all__ = [
    "ArchConfig",
    "BaseConfig",
    "CheckpointConfig",
    "ConfigError",
    "CopilotConfig",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "KernelsConfig",
    "LoraConfig",
    "MistakeLogConfig",
    "ModelConfig",
    "OfflineConfig",
    "PilotConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "ZarrStoreConfig",
    "ZeroConfig",
    "apply_overrides",
    "dump_yaml",
    "engine_config",
    "from_dict",
    "load_config",
    "parse_override",
    "render_deepspeed",
    "resolve_epochs",
    "to_dict",
]
