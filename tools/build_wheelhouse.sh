#!/usr/bin/env bash
# Build the offline wheel folder for `tools/gpu_check.sh --wheelhouse DIR`, on a machine with
# network access (docs/gpu_check.md): every dependency of the check except torch and triton (the
# GPU machine's own CUDA torch is used), DeepSpeed as a pure-Python wheel (no compiled ops), the
# build backend for the project's editable install, and the project's own wheel. No MLflow.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

usage() {
  cat <<'EOF'
Usage: tools/build_wheelhouse.sh [--python-version 3.11] [--platform TAG ...] DIR

Downloads/builds into DIR every wheel tools/gpu_check.sh installs, for the GPU machine's Python
and platform (binary wheels only), so that `tools/gpu_check.sh --wheelhouse DIR` needs no network:
  - the requirements of `tools/gpu_check.sh --print-requirements` and their dependencies
    (never torch or triton: the GPU machine's CUDA torch is used; never MLflow: tracking is off)
  - DeepSpeed built with DS_BUILD_OPS=0 (pure Python; its dependencies minus torch are added)
  - setuptools and wheel (the build backend of the project's editable install)
  - the project's own wheel (tcp-*.whl)
Prints the folder's size and its largest wheels at the end.

Options:
  --python-version X.Y  the GPU machine's Python (default 3.11)
  --platform TAG        a platform tag its pip accepts; repeat for several (default:
                        manylinux_2_28_x86_64, manylinux_2_17_x86_64 and manylinux2014_x86_64,
                        i.e. glibc >= 2.28; pip does not derive the older tags itself)
  -h, --help            this text
Environment: PYTHON, the interpreter running pip here (default: python3).
EOF
}

die() { echo "build_wheelhouse.sh: $*" >&2; exit 2; }

PY=${PYTHON:-python3}
PYVER=3.11
PLATFORMS=()
DIR=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --python-version) [ "$#" -ge 2 ] || die "--python-version needs a value"; PYVER=$2; shift 2 ;;
    --platform) [ "$#" -ge 2 ] || die "--platform needs a value"; PLATFORMS+=("$2"); shift 2 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [ -z "$DIR" ] || die "one DIR only (got '$DIR' and '$1')"; DIR=$1; shift ;;
  esac
done
[ -n "$DIR" ] || { usage >&2; exit 2; }
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work (set PYTHON)"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PIP=("$PY" -m pip --disable-pip-version-check)
if [ "${#PLATFORMS[@]}" -eq 0 ]; then
  PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
fi
TARGET=(--only-binary=:all: --python-version "$PYVER")
for p in "${PLATFORMS[@]}"; do TARGET+=(--platform "$p"); done

mapfile -t REQS < <(PYTHON="$PY" bash "$HERE/gpu_check.sh" --print-requirements)
DS_SPEC=""
OTHERS=()
ON_TORCH=()   # pure-Python packages that require torch: fetched without their dependencies
for r in "${REQS[@]}"; do
  case "$r" in
    deepspeed*) DS_SPEC=$r ;;
    peft*|accelerate*) ON_TORCH+=("$r") ;;
    *) OTHERS+=("$r") ;;
  esac
done
[ -n "$DS_SPEC" ] || die "no deepspeed in the requirements (tools/gpu_check.sh --print-requirements)"

echo "[build_wheelhouse] DeepSpeed ($DS_SPEC) as a pure-Python wheel (DS_BUILD_OPS=0)"
rm -f "$DIR"/deepspeed-*.whl
DS_BUILD_OPS=0 "${PIP[@]}" wheel -q --no-deps --no-binary deepspeed -w "$DIR" "$DS_SPEC"
if [ "${#ON_TORCH[@]}" -gt 0 ]; then
  echo "[build_wheelhouse] ${ON_TORCH[*]} without their dependencies (they require torch)"
  "${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$DIR" "${ON_TORCH[@]}"
fi
# Their own requirements, less torch (read from the wheels' metadata, so they follow their
# versions).
TORCH_WHEELS=("$DIR"/deepspeed-*.whl)
for r in "${ON_TORCH[@]}"; do
  name=$(echo "$r" | sed -E 's/[^A-Za-z0-9_.-].*//')
  TORCH_WHEELS+=("$(compgen -G "$DIR/${name}-*.whl" | head -n1)")
done
mapfile -t DS_DEPS < <("$PY" - "${TORCH_WHEELS[@]}" <<'EOF'
import re, sys, zipfile
from email.parser import Parser
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    for req in msg.get_all("Requires-Dist") or []:
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()
        # torch is the GPU machine's; peft/accelerate are fetched above, without torch
        if name not in ("torch", "triton", "peft", "accelerate") and "extra ==" not in req:
            print(req)
EOF
)

echo "[build_wheelhouse] dependencies for Python $PYVER on ${PLATFORMS[*]}"
"${PIP[@]}" download -q "${TARGET[@]}" -d "$DIR" "${OTHERS[@]}" "${DS_DEPS[@]}" \
  "setuptools>=68" wheel

echo "[build_wheelhouse] the project's wheel"
# The build backend's deprecation notices are noise here; shown only when the build fails.
if ! log=$("${PIP[@]}" wheel -q --no-deps -w "$DIR" "$ROOT" 2>&1); then
  echo "$log" >&2
  die "building the project's wheel failed (output above)"
fi

for bad in torch triton mlflow nvidia_; do
  if compgen -G "$DIR/${bad}*.whl" >/dev/null; then
    die "$DIR has $bad wheels, which the check must not install; remove them"
  fi
done
echo "[build_wheelhouse] $DIR: $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1); largest:"
find "$DIR" -name '*.whl' -printf '%s %f\n' | sort -rn | head -n 8 \
  | awk '{printf "  %6.1f MiB  %s\n", $1 / 1048576, $2}'
echo "[build_wheelhouse] on the GPU machine: tools/gpu_check.sh --wheelhouse $DIR"
