"""Regenerate a base model that ships with tcp (`tcp/assets/base/<key>/`), with tcp's own base
phase, so that a fresh clone of that config fine-tunes at once instead of pre-training.

    deepspeed --num_gpus 2 tools/ship_base.py --config configs/default.yaml

Run it after changing `base.*` or `model.arch` in a config whose base model ships (`SHIPS` in
tests/unit/test_shipped_base.py names those configs; the test fails until it is done). To ship
another config's base model, run it with that config and add the config to `SHIPS`. It runs the base
phase exactly as the main job does (on 2 CPU ranks, as the shipped models were made; the batch
each rank draws depends on the world size) into a staging folder, then moves the model to
`tcp/assets/base/<key>/`. Commit the new folder and `git rm` the folder of the old key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

from tcp.config import ConfigError, RunConfig, load_config
from tcp.errors import RunError
from tcp.runtime import quiet
from tcp.runtime.collective import shutdown
from tcp.runtime.console import setup_logging
from tcp.runtime.process_group import init_distributed
from tcp.training.base_phase import SHIPPED, base_key, ensure_base_model
from tcp.training.build import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/ship_base.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the config whose base model ships")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        setup_logging()  # a bad $TCP_LOG_LEVEL is a config error
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    quiet.install()  # the expected third-party messages, as in the main job
    try:
        return _ship(cfg)
    except RunError as e:  # the threads setting, ranks that disagree on the cache, ...
        print(f"{e.kind} error: {e}", file=sys.stderr)
        shutdown()
        return 2


def _ship(cfg: RunConfig) -> int:
    rank, world, device = init_distributed()
    tokenizer = load_tokenizer(cfg)
    key = base_key(cfg, tokenizer)
    dest = SHIPPED / key
    if (dest / "config.json").is_file():
        if rank == 0:
            print(f"{dest} already ships; nothing to do")
        shutdown()
        return 0
    staging = SHIPPED.parent / ".staging"  # in the repository: every rank sees it
    cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, cache_dir=str(staging)))
    made = ensure_base_model(cfg, tokenizer, rank=rank, world=world, device=device)
    if rank == 0:
        os.replace(made, dest)
        shutil.rmtree(staging, ignore_errors=True)
        print(f"shipped {dest} ({world} ranks); commit it and remove the old key's folder")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
