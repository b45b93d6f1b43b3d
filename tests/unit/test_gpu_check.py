"""tools/gpu_check.sh and tools/gpu_check.py: arguments are checked before anything expensive,
and the whole pipeline except the CUDA kernels runs on CPU at the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tcp.config import KernelsConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def sh(*args: str, timeout: int = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, **env})


def test_help_prints_usage() -> None:
    r = sh("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: tools/gpu_check.sh")
    for flag in ("--wheelhouse", "--skip-install", "--skip-tests", "--device", "--preset",
                 "--out"):
        assert flag in r.stdout
    for tool in ("tools/gpu_check.py", "tools/build_wheelhouse.sh"):
        r = subprocess.run(["bash", tool, "--help"] if tool.endswith(".sh")
                           else [sys.executable, tool, "--help"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr


def test_missing_wheelhouse_fails_at_once(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    r = sh("--wheelhouse", str(tmp_path / "nowhere"), "--venv", str(venv))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--wheelhouse" in lines[0] and "nowhere" in lines[0], r.stderr
    assert not venv.exists()  # nothing was created


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device"),
    (["--preset", "huge"], "--preset"),
    (["--frobnicate"], "unknown argument"),
    (["--out"], "--out needs a value"),
])
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    r = sh(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_missing_torch_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "python"  # an interpreter whose `import torch` fails
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = sh("--device", "cpu", PYTHON=str(fake))
    assert r.returncode == 2 and "import torch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_requirements_leave_out_torch_and_mlflow() -> None:
    r = sh("--print-requirements")
    assert r.returncode == 0, r.stderr
    names = {line.split(">")[0].split("=")[0].split(";")[0].strip().lower()
             for line in r.stdout.splitlines()}
    assert {"deepspeed", "transformers", "zarr", "pytest"} <= names
    assert not names & {"torch", "triton", "mlflow"}


def _positive(x: float) -> bool:
    return isinstance(x, float | int) and x > 0


@pytest.mark.slow
@pytest.mark.extended
def test_cpu_pipeline_writes_every_key(tmp_path: Path) -> None:
    """The shell script's CPU path in this environment, which runs
    `tools/gpu_check.py --device cpu --preset tiny --out <tmp>/x.json`."""
    out = tmp_path / "x.json"
    r = sh("--skip-install", "--skip-tests", "--device", "cpu", "--preset", "tiny",
           "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"JSON: {out}" in r.stdout
    res = json.loads(out.read_text())

    j = res["joint"]
    assert all(_positive(j["median_s"][arm]) for arm in ("joint", "log_off", "pilot_only"))
    assert _positive(j["joint_over_pilot_only"])
    assert j["joint_over_pilot_only_goal"] == pytest.approx(1 + j["flops_ratio"] + 0.05)
    assert j["flops_ratio"] == pytest.approx(j["params"]["copilot"] / j["params"]["pilot"])
    assert 0 < j["copilot_share"] < 1
    assert _positive(j["log_on_over_off"])
    assert _positive(j["copilot_phase_s"]) and _positive(j["pilot_phase_s"])
    assert j["steps_timed"] >= 2
    assert all(_positive(v) for v in j["peak_memory"].values())  # CPU: peak resident set

    f = res["fused_loss"]
    assert f["chunk_mib"] == KernelsConfig().chunk_mib
    for op in ("copilot_loss", "pilot_loss"):
        assert _positive(f[op]["time_ratio"]) and f[op]["memory_ratio"] >= 0
        for path in ("eager", "fused"):
            assert _positive(f[op][path]["fwd_s"]) and f[op][path]["peak_bytes"] >= 0

    d = res["decode"]
    assert _positive(d["pilot_s_per_token"]) and _positive(d["pilot_copilot_s_per_token"])
    assert _positive(d["ratio"]) and d["goal"] > 1.1

    e = res["eval_memory"]
    for phase in ("diagnostics", "decoding"):
        assert e[phase]["peak_bytes"] >= 0 and e[phase]["peak_over_logits"] >= 0

    assert set(res["goals"]) == {"joint_over_pilot_only", "fused_copilot_loss_time",
                                 "fused_copilot_loss_memory", "decode_ratio",
                                 "eval_memory_over_logits"}
    for g in res["goals"].values():
        assert isinstance(g["met"], bool) and _positive(g["goal"]) and g["value"] >= 0
    assert res["preset"] == "tiny" and res["device"] and res["versions"]["torch"]
