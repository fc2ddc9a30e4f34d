#!/usr/bin/env bash
# The GPU engines as a user runs them, through `accelerate launch train.py`: the demo (embedded SmolLM2,
# its organism, the recommended target-free form) runs whole once on one GPU; then its train stage runs again
# from the same data, organism and geometry under each engine config: QLoRA on one GPU, DDP on every visible
# GPU, FSDP and DeepSpeed ZeRO-2. One line per config (bench/engine_check.py): processes seen, steps against
# the global batch's count, step time, tokens/s, peak memory, each stage's seconds and device and each
# generation's prompts per second, and `ok` when the train stage started once. The first line says where it
# ran; the last, how long the whole check took (one H200: under 8 minutes).
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

# where it ran, as the first line
python - "$gpus" >> "$results" <<'PY'
import json, os, platform, subprocess, sys, torch
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip().splitlines()
print(json.dumps({"mode": "machine", "gpus": gpu, "gpus_used": int(sys.argv[1]), "cpus": os.cpu_count(),
                  "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}))
PY
cat "$results"
# cold: the embedded model's conversion and the organism are built again, in a cache of this check's own
export REFCAL_CACHE="$runs/cache"
rm -rf "$runs/single_gpu" "$REFCAL_CACHE"
started=$(date +%s)
check single_gpu single_gpu.yaml 1 run
check qlora single_gpu.yaml 1 train --load_in_4bit true
check ddp multi_gpu_ddp.yaml "$gpus" train
check fsdp fsdp.yaml "$gpus" train
if python -c "import deepspeed" 2>/dev/null; then
  check zero2 deepspeed_zero2.yaml "$gpus" train
else
  echo '{"mode": "zero2", "skipped": "deepspeed is not installed"}' | tee -a "$results"
fi
echo "{\"mode\": \"total\", \"seconds\": $(( $(date +%s) - started ))}" | tee -a "$results"
# the logs' ends and the whole run's profile, for reading what the lines sum up
for log in "$runs"/*.log; do tail -n 200 "$log" > "$out/$(basename "$log")"; done
cp "$runs/single_gpu/profile.json" "$out/single_gpu_profile.json" 2>/dev/null
echo "== results"
cat "$results"
