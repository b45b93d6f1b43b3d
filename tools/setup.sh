#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Idempotent; ~2 minutes fresh.
# torch is installed first and pinned to the CPU build that ships for this machine image; on GPU
# hosts set TCP_TORCH_SPEC (e.g. "torch==2.13.0" from your CUDA index) before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${TCP_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, deepspeed, transformers, zarr, mlflow" \
  || { echo "setup failed: imports do not work; see pip output above" >&2; exit 1; }
