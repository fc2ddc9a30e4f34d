"""One line per engine for bench/gpu_check.sh: whether `accelerate launch train.py` ran as one distributed
run, and how fast. It reads the train stage's engine record (train/train.json) and the launch's console log.

    python -m bench.engine_check RUN_DIR --mode ddp --log LAUNCH.log [--jsonl OUT]

A run is `ok` when the train stage started once (not once per process), every process was seen, and it
trained the step count of its global batch: ceil(rows / (per-device batch x processes x accumulation)) per epoch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def stage_profile(run_dir: Path) -> dict:
    """Each stage this launch ran (run_dir/profile.json): its seconds, the device of its process, and for each
    generation in it the prompts, where and in what dtype they ran, how they were split and how fast."""
    path = run_dir / "profile.json"
    if not path.exists():
        return {}
    stages = {}
    for stage, entry in json.loads(path.read_text()).items():
        generations = {
            name.removeprefix("generation: "): {
                **{k: section[k] for k in ("prompts", "prompts_per_process", "device", "dtype", "batch_size")},
                "prompts_per_second": round(section["prompts"] / max(section["seconds"], 1e-9), 1),
            }
            for name, section in entry["sections"].items()
            if name.startswith("generation: ") and "prompts" in section
        }
        stages[stage] = {"seconds": entry["seconds"], "device": entry.get("device"), "generation": generations}
    return stages


def engine_line(run_dir: Path, mode: str, log: str, processes_launched: int) -> dict:
    engine = json.loads((run_dir / "train" / "train.json").read_text())["engine"]
    expected_steps = math.ceil(engine["rows"] / engine["global_batch"]) * max(1, round(engine["epochs"]))
    starts = log.count("→ train\n")
    line = {"mode": mode, **engine, "expected_steps": expected_steps, "train_stage_starts": starts}
    line["stages"] = stage_profile(run_dir)
    summary = run_dir / "summary.json"
    if summary.exists():  # a whole run: its wall time, and where its answers were computed
        recorded = json.loads(summary.read_text())
        line["wall_seconds"], line["computed_on"] = recorded["wall_seconds"], recorded.get("computed_on")
    line["ok"] = starts == 1 and engine["processes"] == processes_launched and engine["steps"] == expected_steps
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--mode", required=True, help="a label: single_gpu, qlora, ddp, fsdp, zero2, ...")
    parser.add_argument("--log", type=Path, required=True, help="what the launch printed (stdout and stderr)")
    parser.add_argument("--processes", type=int, required=True, help="processes the launch started")
    parser.add_argument("--jsonl", type=Path, help="append the line here too")
    args = parser.parse_args()
    line = json.dumps(engine_line(args.run_dir, args.mode, args.log.read_text(errors="replace"), args.processes))
    print(line)
    if args.jsonl:
        with open(args.jsonl, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
