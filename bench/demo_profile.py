"""The demo from a cold start, timed per stage and inside each stage: bench/results/demo_profile.json.

Runs what `make demo` runs (`train.py --config configs/demo_smollm2.yaml` into runs/demo) with an empty
refcal cache (runs/cold-cache, emptied first and kept: the organism the later benchmarks read from
runs/demo lives there), so the embedded model is converted and the organism built, and reads the run's profile
(run_dir/profile.json: each stage's timed sections, calibration/infra/profiling.py). The outcome is set beside
a reference summary (the committed bench/results/demo.json, read before anything runs) with the
reference's 95% Wilson intervals: a faster demo must land inside them, or on the better side.

    python -m bench.demo_profile                          # about 10-15 minutes on 2 CPU cores
    python -m bench.demo_profile --reference OTHER.json   # compare with another demo summary
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from refcal.calibration.evaluation import wilson_rate
from refcal.calibration.infra.artifacts import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIG = "configs/demo_smollm2.yaml"
RUN_DIR = ROOT / "runs" / "demo"
COLD_CACHE = ROOT / "runs" / "cold-cache"  # kept afterwards: runs/demo's organism lives there
# rates compared with the reference, and which way is better
SHOULD_REFUSE = ("harmful", "frame_attack", "xstest_unsafe", "jbb_harmful")
SHOULD_ANSWER = ("over_refusal", "benign", "xstest_safe", "jbb_benign")


def machine() -> dict:
    import torch

    from refcal.calibration.models import native_bf16

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_bf16": native_bf16(cpu=not torch.cuda.is_available()),
        "torch": torch.__version__,
    }


def stage_table(profile: dict) -> dict:
    """Each stage's seconds, its top-level sections, and the rest no section explains."""
    table = {}
    for stage, entry in profile.items():
        top = {name: s for name, s in entry["sections"].items() if " > " not in name}
        timed = sum(s["seconds"] for s in top.values())
        table[stage] = {
            "seconds": entry["seconds"],
            "sections": entry["sections"],
            "untimed_seconds": round(entry["seconds"] - timed, 1),
        }
    return table


def kind_counts(summary: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key, n in summary["n"].items():
        kind = key.split("/", 1)[0]
        counts[kind] = counts.get(kind, 0) + n
    return counts


def rates(summary: dict, side: str) -> dict[str, float]:
    found = dict(summary[side]["by_kind"])
    found.update({k: v for k, v in summary[side].items() if isinstance(v, float)})
    return found


def compare(reference: dict, summary: dict) -> dict:
    """Every shared rate: the reference's rate, n and 95% interval, the new rate, and the verdict."""
    counts = kind_counts(reference)
    out = {}
    for side in ("organism", "calibrated"):
        old, new = rates(reference, side), rates(summary, side)
        for name in (*SHOULD_REFUSE, *SHOULD_ANSWER):
            if name not in old or name not in new or name not in counts:
                continue
            n = counts[name]
            interval = wilson_rate(round(old[name] * n), n)["ci95"]
            value = new[name]
            higher_is_better = name in SHOULD_REFUSE
            if interval[0] <= value <= interval[1]:
                verdict = "inside"
            elif (value > interval[1]) == higher_is_better:
                verdict = "better"
            else:
                verdict = "worse"
            out[f"{side}/{name}"] = {"reference": old[name], "n": n, "ci95": interval, "now": value, "verdict": verdict}
    out["kl_benign"] = {"reference": reference.get("kl_benign"), "now": summary.get("kl_benign")}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=str(RESULTS / "demo.json"))
    parser.add_argument("--out", default=str(RESULTS / "demo_profile.json"))
    args = parser.parse_args(argv)
    reference = json.loads(Path(args.reference).read_text())

    for folder in (RUN_DIR, COLD_CACHE):
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "REFCAL_CACHE": str(COLD_CACHE), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "train.py", "--config", CONFIG]
    started = time.time()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    wall = time.time() - started
    summary = json.loads((RUN_DIR / "summary.json").read_text())
    stages = stage_table(json.loads((RUN_DIR / "profile.json").read_text()))
    result = {
        "command": "python -m bench.demo_profile",
        "runs": f"{' '.join(['python', *command[1:]])} with REFCAL_CACHE empty (make demo from a cold cache)",
        "machine": machine(),
        "total_seconds": round(wall, 1),
        "outside_stages_seconds": round(wall - sum(s["seconds"] for s in stages.values()), 1),
        "stages": stages,
        "outcome_against_reference": {
            "reference": os.path.relpath(args.reference, ROOT),
            **compare(reference, summary),
        },
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("total_seconds", "outside_stages_seconds")}))
    for stage, entry in stages.items():
        print(f"{stage:10s} {entry['seconds']:7.1f}s")
    worse = [
        k for k, v in result["outcome_against_reference"].items() if isinstance(v, dict) and v.get("verdict") == "worse"
    ]
    print("outside the reference's intervals, worse:", worse or "none")


if __name__ == "__main__":
    main()
