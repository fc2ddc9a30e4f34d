#!/usr/bin/env bash
# The GPU paths on one GPU: a few regularized LoRA steps on a random Llama-3.2-1B-shaped model with bf16,
# with QLoRA (4-bit base), under FSDP and under DeepSpeed ZeRO-2 (one process each), printing step time,
# tokens/s and peak memory for each. Needs refcal installed with its qlora extra (pip install -e '.[qlora]')
# and, for ZeRO-2, deepspeed; nothing is downloaded.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # results: OUT_DIR/gpu_check.jsonl (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
results="$out/gpu_check.jsonl"
: > "$results"

check() {  # check MODE ACCELERATE_CONFIG [extra accelerate flags]
  local mode=$1 config=$2
  shift 2
  echo "== $mode ($config)"
  if ! accelerate launch --config_file "accelerate_configs/$config" --num_processes 1 "$@" \
      bench/gpu_check.py --mode "$mode" --jsonl "$results"; then
    echo "{\"mode\": \"$mode\", \"error\": \"failed: see the log above\"}" >> "$results"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
check bf16 single_gpu.yaml
check qlora single_gpu.yaml
check fsdp fsdp.yaml
if python -c "import deepspeed" 2>/dev/null; then
  check zero2 deepspeed_zero2.yaml
else
  echo '{"mode": "zero2", "skipped": "deepspeed is not installed"}' >> "$results"
fi
cat "$results"
