#!/usr/bin/env bash
# Run the default task and each built-in family over seeds, then summarise per task
# (docs/results.md, issue 18). One run at a time: each uses both CPU ranks.
#   tools/run_families.sh [OUT_ROOT] [SEEDS...]       e.g. tools/run_families.sh runs/families 0 1 2
# Extra config overrides for every run: TCP_OVERRIDES="copilot... train..." tools/run_families.sh
# Tasks: TCP_TASKS="default multistep choice yesno" (the default).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/families}; [ $# -gt 0 ] && shift
seeds=("$@"); [ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
mkdir -p "$out"
# shellcheck disable=SC2206
tasks=(${TCP_TASKS:-default multistep choice yesno})
# shellcheck disable=SC2206
extra=(${TCP_OVERRIDES:-})
port=29700
for s in "${seeds[@]}"; do
  for task in "${tasks[@]}"; do
    dir="$out/$task-seed$s"
    if [ -f "$dir/results.json" ]; then echo "[run_families] $dir done, skipped"; continue; fi
    port=$((port + 1))
    echo "[run_families] $task seed $s -> $dir"
    .venv/bin/deepspeed --num_gpus 2 --master_port "$port" launcher/train.py \
      --config "configs/$task.yaml" "seed=$s" "output_dir=$dir" resume=auto \
      ${extra[@]+"${extra[@]}"} >> "$dir.log" 2>&1 \
      || { echo "[run_families] $dir failed: see $dir.log"; exit 1; }
  done
done
.venv/bin/python tools/summarize_runs.py "$out"/*-seed*/
