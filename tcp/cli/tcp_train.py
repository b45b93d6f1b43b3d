"""Command line of `launcher/train.py` / `tcp-train`: parse -> build -> run -> close.

    deepspeed --num_gpus 2 launcher/train.py --config configs/default.yaml [key=value ...]
    deepspeed --num_gpus 2 launcher/train.py --offline-from runs/seed0 output_dir=runs/off

Configuration errors are reported before DeepSpeed, any model or any data is touched: the
training jobs (tcp.training, which load transformers and DeepSpeed) are imported inside the
functions that run them, so a bad config, `--help` and `--dry-run` answer without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tcp.config import ConfigError, RunConfig, dump_yaml, load_config
from tcp.errors import RunError
from tcp.runtime import quiet
from tcp.runtime.console import LEVELS, setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
"""What runs without `--config`: the repository's configs/default.yaml, the embedded default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI arguments."""
    p = argparse.ArgumentParser(
        prog="launcher/train.py",
        description="Jointly train a Pilot and a Copilot (Transformer Copilot) on two DeepSpeed "
        "engines, then evaluate Pilot vs Pilot+Copilot. Run under the `deepspeed` launcher, e.g. "
        "`deepspeed --num_gpus 2 launcher/train.py --config configs/default.yaml`.",
        epilog="Overrides are dotted keys, e.g. train.steps=200 train.pilot.lr=3e-4 "
        "eval.lambdas='[0.5,1.0]'. Every key is documented in tcp/config/ (one file per "
        "section) and configs/*.yaml. "
        "Continue an interrupted run with resume=auto (or resume=<checkpoint folder>). Exit "
        "codes: 0 done; 2 bad config or data (before any model loads), a resume that does not "
        "fit (nothing changed), output_dir "
        "in use by a live run or not usable, a full disk while checkpointing, or "
        "(eval.strict=true) more generations cut at eval.max_new_tokens than "
        "eval.truncation_warn_frac (results are still written); 143/130 stopped by "
        "SIGTERM/SIGINT or by the launcher's exit, after a clean checkpoint. Clusters and "
        "schedulers: docs/cluster.md; signals, checkpoints, logging: docs/operations.md.",
    )
    p.add_argument("--config", type=str, default=None,
                   help="YAML run config (default: configs/default.yaml, the embedded default)")
    p.add_argument("--log-level", choices=LEVELS, default=None,
                   help="tcp's console messages (the `tcp` logger, rank 0): debug, info "
                   "(default), warning or error; $TCP_LOG_LEVEL sets it too. Progress bars and "
                   "the result table are printed at any level")
    p.add_argument("--offline-from", type=Path, default=None, metavar="RUN",
                   help="train a fresh Copilot from the Mistake Log of this finished run alone "
                   "(no Pilot forward or backward), then evaluate it with that run's Pilot; the "
                   "config is RUN's config.yaml plus the overrides, which must set output_dir "
                   "(e.g. copilot.hidden_size=64 copilot.init_from=none for another size). "
                   "Run with as many ranks as the log has shards. docs/method.md")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, both DeepSpeed configs and a per-rank memory "
                   "plan of both engines (docs/memory_plan.md), then exit 0 without loading any "
                   "weights (a pretrained Pilot's config.json must be local or reachable, else "
                   "the plan is a one-line note)")
    p.add_argument("--world-size", type=_positive_int, default=None, metavar="N",
                   help="--dry-run: plan for N ranks (default: $WORLD_SIZE, else 1), e.g. a "
                   "cluster job planned from a laptop")
    p.add_argument("--device-memory-gib", type=float, default=None, metavar="X",
                   help="--dry-run: memory of one device in GiB, for the plan's warning "
                   "(default: the local CUDA device's, else unknown)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The job's config: `--config` (or the defaults) plus the overrides, or with
    `--offline-from` the source run's recorded config plus the overrides
    (tcp.training.offline_source)."""
    if args.offline_from is None:
        if any(o.split("=", 1)[0].strip() == "offline.source" for o in args.overrides):
            raise ConfigError("offline.source: use --offline-from <finished run> (it also "
                              "loads that run's config)")
        return load_config(args.config or default_config(), args.overrides)
    if args.config is not None:
        raise ConfigError("--offline-from uses the source run's config.yaml; drop --config "
                          "(key=value overrides still apply)")
    from tcp.training.offline_source import offline_config  # heavy: see the module docstring

    return offline_config(args.offline_from, args.overrides)


def default_config() -> Path:
    """configs/default.yaml of the repository tcp runs from."""
    if not DEFAULT_CONFIG.is_file():
        raise ConfigError(f"no --config given and {DEFAULT_CONFIG} (the default) does not "
                          "exist beside this tcp install; pass --config <file>")
    return DEFAULT_CONFIG


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {n})")
    return n


def dry_run(cfg: RunConfig, *, world_size: int | None = None,
            device_gib: float | None = None) -> str:
    """What --dry-run prints: the resolved config, both DeepSpeed configs and the memory plan
    (tcp.training.memory_plan) for `world_size` ranks (None: $WORLD_SIZE, else 1) on devices of
    `device_gib` GiB (None: the local CUDA device's, else unknown)."""
    import torch  # heavy: see the module docstring

    from tcp.training.memory_plan import GiB, format_plan, plan
    from tcp.training.run_files import ds_configs

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if device_gib is None and torch.cuda.is_available():
        device_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    return ("# resolved config\n" + dump_yaml(cfg) +
            f"# DeepSpeed configs (world_size={world})\n" +
            json.dumps(ds_configs(cfg, world), indent=2) + "\n" +
            format_plan(plan(cfg, world), device_gib))


def train_main(argv: list[str] | None = None) -> int:
    """Entry point. Returns the process exit code."""
    args = parse_args(argv)
    try:
        setup_logging(args.log_level)  # a bad $TCP_LOG_LEVEL is a config error
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if cfg.offline.source is not None:  # one engine, no Pilot: the joint plan does not fit
            print("# resolved config (offline Copilot training)\n" + dump_yaml(cfg))
            return 0
        print(dry_run(cfg, world_size=args.world_size, device_gib=args.device_memory_gib))
        return 0

    from tcp.runtime.collective import shutdown  # heavy (torch): only when a job runs
    from tcp.runtime.preemption import StopSignal

    # expected, harmless third-party messages off the console (tcp/runtime/quiet.py)
    quiet.install()
    try:
        if cfg.offline.source is not None:
            # heavy (torch, transformers, DeepSpeed): only when this runs
            from tcp.training.offline_source import launched_world_size, open_source

            # A bad source fails here, in a second, before DeepSpeed is even imported; the job
            # checks it again once the ranks are connected.
            open_source(cfg, world=launched_world_size(os.environ))
            # heavy (torch, transformers, DeepSpeed): only when this runs
            from tcp.training.offline_job import run_offline as job
        else:
            # heavy (torch, transformers, DeepSpeed): only when this runs
            from tcp.training.joint_job import run as job
        results = job(cfg)
    except RunError as e:  # a resume that does not fit, a folder in use, a full disk, ...
        print(f"{e.kind} error: {e}", file=sys.stderr)
        shutdown()  # every rank raised it alike (tcp.runtime.collective.agree)
        return 2
    shutdown()
    if results.get("stopped_by"):
        return StopSignal.exit_code(results["stopped_by"])
    return 0


if __name__ == "__main__":
    sys.exit(train_main())

