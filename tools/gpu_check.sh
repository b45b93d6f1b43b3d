#!/usr/bin/env bash
# One command on a fresh GPU machine (docs/gpu_check.md): install tcp next to the machine's own
# CUDA torch, run the gpu- and kernels-marked tests on CUDA, then tools/gpu_check.py (a short
# joint run at ~1B Pilot size against a Pilot-only run, the fused losses, decoding, evaluation
# memory), which writes one JSON. About 8 minutes on one GPU. Never installs torch.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<'EOF'
Usage: tools/gpu_check.sh [options] [-- key=value ...]

Checks tcp on this machine's GPU and writes one JSON (docs/gpu_check.md):
  1. a venv with --system-site-packages (the machine's CUDA torch stays the one used; torch is
     never installed), the project (editable) and the rest of its dependencies: from a local
     wheel folder with --wheelhouse, else from the package index; MLflow is not needed
  2. pytest -m "gpu or kernels" on CUDA
  3. tools/gpu_check.py: joint vs Pilot-only step time at ~1B Pilot size, Copilot share, Mistake
     Log on/off, fused vs eager losses, decode time with/without the Copilot, peak memory

Options:
  --wheelhouse DIR      install offline: pip --no-index --find-links DIR (a folder made by
                        tools/build_wheelhouse.sh DIR on a networked machine)
  --venv DIR            the venv to create or reuse (default: .venv-gpu in the repository)
  --skip-install        create and install nothing; run with $PYTHON as it is (an environment
                        that already has tcp installed)
  --skip-tests          do not run the gpu/kernels tests
  --device cuda|cpu     default cuda; cpu runs everything but the CUDA kernels (for testing)
  --preset 1b|tiny      default 1b; tiny takes seconds on a CPU
  --out FILE            the JSON written (default: gpu_check.json)
  --print-requirements  print what is installed besides the project and torch, and exit
  -h, --help            this text
  -- key=value ...      config overrides for the joint run (e.g. train.pilot.micro_batch_size=4)

Environment: PYTHON, the interpreter whose torch is used (default: python3).
Exit status: 0 when every stage ran and the tests passed (goals met or not: read the JSON),
1 when a stage or a test failed, 2 for bad arguments or a missing torch (nothing was done).
EOF
}

die() { echo "gpu_check.sh: $*" >&2; exit 2; }   # bad arguments / no torch: nothing was done
fail() { echo "gpu_check.sh: $*" >&2; exit 1; }  # a stage failed

PY=${PYTHON:-python3}
WHEELHOUSE=""
VENV="$ROOT/.venv-gpu"
SKIP_INSTALL=0
SKIP_TESTS=0
DEVICE=cuda
PRESET=1b
OUT=gpu_check.json
PRINT_REQS=0
TESTS_RC=0
OVERRIDES=()

need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --wheelhouse) need_value "$@"; WHEELHOUSE=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --device) need_value "$@"; DEVICE=$2; shift 2 ;;
    --preset) need_value "$@"; PRESET=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --print-requirements) PRINT_REQS=1; shift ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# The requirements besides the project and torch: pyproject.toml's dependencies and test extra,
# less what the check never imports (MLflow: tracking is off; datasets: the arithmetic source)
# and torch/triton (the machine's). peft (and accelerate, which peft and pretrained ZeRO-3
# loading need) stay: the gpu tests train LoRA Pilots from saved twins.
print_requirements() {
  "$PY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
skip = {"torch", "triton", "mlflow", "datasets", "pyarrow"}
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    if name not in skip:
        print(req)
EOF
}

if [ "$PRINT_REQS" = 1 ]; then print_requirements; exit 0; fi

# Validate everything before anything expensive.
case "$DEVICE" in cuda|cpu) ;; *) die "--device must be cuda or cpu, got '$DEVICE'" ;; esac
case "$PRESET" in 1b|tiny) ;; *) die "--preset must be 1b or tiny, got '$PRESET'" ;; esac
if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: no such directory (make one with tools/build_wheelhouse.sh DIR on a networked machine)"
  compgen -G "$WHEELHOUSE/*.whl" >/dev/null || die "--wheelhouse $WHEELHOUSE: no .whl files in it (make it with tools/build_wheelhouse.sh DIR)"
  WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
fi
if [ "$SKIP_INSTALL" = 1 ] && [ -n "$WHEELHOUSE" ]; then
  die "--skip-install and --wheelhouse exclude each other"
fi
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # relative to where the user ran us
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY' (set PYTHON)"
"$PY" -c 'import torch' >/dev/null 2>&1 \
  || die "'$PY -c \"import torch\"' fails: this check uses the machine's own (CUDA) torch and never installs one; install torch for your CUDA, or set PYTHON to an interpreter that has it"
if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "torch ($("$PY" -c 'import torch; print(torch.__version__)')) sees no CUDA device; use a CUDA build of torch on a GPU machine (or --device cpu to exercise the CPU path)"
fi

cd "$ROOT"
START=$SECONDS
stage() { echo "[gpu_check.sh] $* (t=$((SECONDS - START))s)"; }

if [ "$SKIP_INSTALL" = 1 ]; then
  VPY=$PY
else
  stage "venv $VENV (system site packages: torch $("$PY" -c 'import torch; print(torch.__version__)'))"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV" || fail "could not create the venv $VENV (output above)"
  fi
  VPY="$VENV/bin/python"
  # --system-site-packages exposes the base interpreter's packages; a torch that lives in
  # another venv stays invisible. Then run in that environment with --skip-install.
  "$VPY" -c 'import torch' >/dev/null 2>&1 \
    || fail "torch of $PY is not visible in $VENV (is $PY itself in a venv?); install tcp into that environment and use --skip-install"
  PIP=("$VPY" -m pip install -q --disable-pip-version-check)
  if [ -n "$WHEELHOUSE" ]; then PIP+=(--no-index --find-links "$WHEELHOUSE"); fi
  # torch (and triton, which CUDA torch pins) are pinned to what is installed: if anything
  # wanted another version, pip fails here instead of downloading a torch.
  CONSTRAINTS="$VENV/gpu_check_constraints.txt"
  "$VPY" - >"$CONSTRAINTS" <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "triton"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
  REQS="$VENV/gpu_check_requirements.txt"
  print_requirements >"$REQS"
  stage "installing the dependencies${WHEELHOUSE:+ from $WHEELHOUSE}"
  "${PIP[@]}" -c "$CONSTRAINTS" -r "$REQS" || fail "installing the dependencies failed (pip output above)"
  stage "installing the project (editable)"
  "${PIP[@]}" -c "$CONSTRAINTS" --no-deps -e "$ROOT" || fail "installing the project failed (pip output above)"
  "$VPY" -c 'import torch, deepspeed, transformers, zarr, tcp.kernels' \
    || fail "the installed environment cannot import tcp's dependencies (traceback above)"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$SKIP_TESTS" = 0 ]; then
  stage 'pytest -m "gpu or kernels"'
  if [ "$DEVICE" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi
  # A failing test does not stop the measurements; the script still exits 1 at the end.
  "$VPY" -m pytest -q -m "gpu or kernels" -p no:cacheprovider || TESTS_RC=$?
fi

stage "tools/gpu_check.py --device $DEVICE --preset $PRESET"
"$VPY" tools/gpu_check.py --device "$DEVICE" --preset "$PRESET" --out "$OUT" \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"} || fail "tools/gpu_check.py failed (traceback above)"
stage "done; JSON: $OUT"
if [ "$TESTS_RC" != 0 ]; then
  fail "the gpu/kernels tests failed (pytest exit code $TESTS_RC; output above)"
fi
