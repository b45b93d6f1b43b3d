"""The command lines start light and run what they say: `--help` loads no torch (it answers in a
fraction of a second; docs/benchmarks.md has the times), and `launcher/train.py` without
`--config` runs configs/default.yaml."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tcp.cli.tcp_train import DEFAULT_CONFIG, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed", "mlflow", "zarr")


@pytest.mark.parametrize("argv", [
    [str(ROOT / "launcher" / "train.py"), "--help"],
    ["-m", "tcp.cli.tcp_eval", "--help"],
    ["-m", "tcp.cli.tcp_log", "--help"],
], ids=["train", "tcp-eval", "tcp-log"])
def test_help_imports_nothing_heavy(argv, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_no_config_is_configs_default_yaml():
    assert DEFAULT_CONFIG == ROOT / "configs" / "default.yaml"
    assert resolve_config(parse_args([])) == \
        resolve_config(parse_args(["--config", str(ROOT / "configs" / "default.yaml")]))
    assert resolve_config(parse_args(["seed=3"])).seed == 3


def test_dry_run_without_config_equals_default_yaml(tmp_path):
    def dry(*extra):
        env = {**os.environ, "WORLD_SIZE": "2"}
        proc = subprocess.run([sys.executable, str(ROOT / "launcher" / "train.py"), "--dry-run",
                               *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    plain = dry()
    assert "steps: 3000" in plain  # base.steps of configs/default.yaml, not the dataclass's 400
    assert plain == dry("--config", "configs/default.yaml")
