"""ZeRO-3, 2 CPU ranks: the fused Pilot and Copilot losses give the eager paths' gradients.

Every parameter is partitioned (persistence threshold 0), so the fused heads only work if
DeepSpeed gathers the LM head / Copilot head inside their own forward, as designed.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kernels", [pytest.param("torch", marks=pytest.mark.extended), "triton"])
def test_fused_gradients_equal_eager_under_zero3(tmp_path, kernels):
    out = tmp_path / "diffs.json"
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    with socket.socket() as sock:  # a port nothing holds, not one derived from the pid
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "TCP_KERNELS": kernels,
           "TRITON_INTERPRET": "1" if kernels == "triton" else os.environ.get(
               "TRITON_INTERPRET", "0")}
    proc = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", port,
                           str(ROOT / "tests/distributed/fused_grads_worker.py"), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["pilot_partitioned"] == 1.0
    assert d["pilot_loss"] < 1e-5
    assert d["pilot_topk_probs"] < 1e-5 and d["pilot_topk_ids_equal"] == 1.0
    assert d["pilot_pooled"] < 1e-5
    assert d["pilot_grad_params"] > 10
    assert d["pilot_grad"] < 1e-4, d  # relative to each gradient's largest entry
    assert d["copilot_loss"] < 1e-5
    assert d["copilot_grad"] < 1e-4, d
