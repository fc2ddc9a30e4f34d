#!/usr/bin/env bash
# The GPU engines as a user runs them, through `accelerate launch train.py`: the demo (embedded SmolLM2,
# its organism, the recommended target-free form) runs whole once on one GPU; then its train stage runs again
# from the same data, organism and geometry under each engine config: QLoRA on one GPU, DDP on every visible
# GPU, FSDP and DeepSpeed ZeRO-2. One line per config (bench/engine_check.py): processes seen, steps against
# the global batch's count, step time, tokens/s, peak memory, and `ok` when the train stage started once.
# Needs refcal with its qlora extra (pip install -e '.[qlora]'), the embedded model, ../shared/data and, for
# ZeRO-2, deepspeed; nothing is downloaded.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # results: OUT_DIR/gpu_check.jsonl (default bench/results)
#   CONFIG=configs/mine.yaml GPUS=4 bash bench/gpu_check.sh     # another config; DDP/FSDP/ZeRO on 4 GPUs
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
runs=runs/gpu_check
mkdir -p "$out" "$runs"
results="$out/gpu_check.jsonl"
: > "$results"
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
export PYTHONWARNINGS=ignore
# the config's own form (the demo's: the recommended one); the gate is not what is checked
form=(--config "${CONFIG:-configs/demo_smollm2.yaml}" --bf16 true --force_export true)

check() {  # check MODE ACCELERATE_CONFIG PROCESSES COMMAND [flags]: launch train.py, then summarise the run
  local mode=$1 config=$2 processes=$3 command=$4
  shift 4
  local run="$runs/$mode"
  echo "== $mode ($config, $processes processes)"
  if [ "$command" = train ]; then  # the train stage alone, from the whole run's earlier stages
    rm -rf "$run" && mkdir -p "$run"
    for stage in data organism geometry sft_data; do cp -r "$runs/single_gpu/$stage" "$run/"; done
  fi
  if accelerate launch --config_file "accelerate_configs/$config" --num_processes "$processes" \
      train.py "$command" "${form[@]}" --run_dir "$run" --output_dir "$run/train" "$@" 2>&1 | tee "$run.log"; then
    python -m bench.engine_check "$run" --mode "$mode" --log "$run.log" --processes "$processes" --jsonl "$results"
  else
    echo "{\"mode\": \"$mode\", \"error\": \"failed: see $run.log\"}" | tee -a "$results"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi: no GPU"
rm -rf "$runs/single_gpu"
check single_gpu single_gpu.yaml 1 run
check qlora single_gpu.yaml 1 train --load_in_4bit true
check ddp multi_gpu_ddp.yaml "$gpus" train
check fsdp fsdp.yaml "$gpus" train
if python -c "import deepspeed" 2>/dev/null; then
  check zero2 deepspeed_zero2.yaml "$gpus" train
else
  echo '{"mode": "zero2", "skipped": "deepspeed is not installed"}' | tee -a "$results"
fi
echo "== results"
cat "$results"
