"""A calibration run on a cached organism, the code at an older commit against this checkout, side by side
in one run on the same rows: bench/results/run_speed.json.

Both sides calibrate the demo's organism on the demo's rows: runs/demo's data and organism folders are
copied into each side's run folder, so each runs geometry, train, eval and export only, with its own
demo config (configs/demo_smollm2.yaml as that commit has it) and an empty refcal cache (the organism is
read from where runs/demo's record points). The old side is `git archive OLD`, put on the path ahead of
the installed package. With --reuse, a third side runs this checkout again on the new side's cache: the
frozen model's answers, cached by fingerprint and prompts, are then read instead of generated, as in any
later run on the same organism.

    make demo && python -m bench.run_speed              # about 30 minutes on 2 CPU cores
    python -m bench.run_speed --old COMMIT --reuse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from refcal.calibration.infra.artifacts import atomic_write_text
from refcal.data_recipes.sources import default_data_root

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "runs" / "demo"
SPEED = ROOT / "runs" / "speed"
OLD = "8b2a8ce"  # padded batches, gradient checkpointing, a separate float32 capture pass and layer choice
STAGES = ("geometry", "train", "eval")
PACKAGES = ("train", "calibration", "data_recipes")  # installed as refcal.<name>
SHOWN = ("harmful", "frame_attack", "over_refusal", "benign")
EXTERNAL = ("xstest_safe", "xstest_unsafe", "jbb_harmful", "jbb_benign")


def checkout(commit: str, folder: Path) -> Path:
    """The project at `commit` in `folder`, importable as refcal.* from folder/site."""
    source = folder / "source"
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(source, filter="data")
    package = folder / "site" / "refcal"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(source / name)
    return source


def run_side(name: str, source: Path, cache: Path, python_path: str | None) -> dict:
    run_dir = SPEED / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for stage in ("data", "organism"):
        shutil.copytree(DEMO / stage, run_dir / stage)
    env = {
        **os.environ,
        "REFCAL_CACHE": str(cache),
        "REFCAL_DATA_DIR": str(default_data_root()),
        "PYTHONWARNINGS": "ignore",
    }
    if python_path:
        env["PYTHONPATH"] = python_path
    command = [sys.executable, "train.py", "--config", "configs/demo_smollm2.yaml", "--run_dir", str(run_dir)]
    started = time.time()
    subprocess.run(command, cwd=source, env=env, check=True)
    wall = time.time() - started
    timings = json.loads((run_dir / "timings.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    calibrated = summary["calibrated"]
    return {
        "wall_seconds": round(wall, 1),
        "stage_seconds": {stage: timings[stage] for stage in STAGES},
        "calibration_seconds": round(sum(timings[stage] for stage in STAGES), 1),
        "train_engine": json.loads((run_dir / "train" / "train.json").read_text())["engine"],
        "calibrated": {
            **{kind: calibrated["by_kind"][kind] for kind in SHOWN},
            **{name: calibrated[name] for name in EXTERNAL if name in calibrated},
        },
        "kl_benign": summary["kl_benign"],
        "refusal_layer": summary["refusal_layer"],
        "organism_fingerprint": json.loads((run_dir / "geometry" / "geometry.json").read_text())["fingerprint"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default=OLD, help="the commit to compare with")
    parser.add_argument("--reuse", action="store_true", help="also time a second new run reusing cached answers")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "run_speed.json"))
    args = parser.parse_args(argv)
    if not (DEMO / "organism").is_dir():
        raise SystemExit("run the demo first (make demo): its data and organism are the rows both sides calibrate")
    new_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    organism = json.loads((DEMO / "organism" / "organism.json").read_text())
    sides = {}
    with tempfile.TemporaryDirectory(prefix="refcal-speed-") as folder:
        folder = Path(folder)
        old_source = checkout(args.old, folder / "old")
        sides["old"] = run_side("old", old_source, folder / "cache-old", str(folder / "old" / "site"))
        sides["new"] = run_side("new", ROOT, folder / "cache-new", None)
        if args.reuse:
            sides["new_reusing_answers"] = run_side("new_reusing_answers", ROOT, folder / "cache-new", None)
    old_seconds = sides["old"]["calibration_seconds"]
    result = {
        "command": "python -m bench.run_speed" + (" --reuse" if args.reuse else ""),
        "what": "geometry + train + eval on the demo's cached organism and rows, each side with its own demo config",
        "old_commit": args.old,
        "new_commit": new_commit.stdout.strip()
        + " (with uncommitted changes)"
        * bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
        ),
        "organism_key": organism["key"],
        "sides": sides,
        "ratio_new_over_old": {
            name: round(side["calibration_seconds"] / old_seconds, 3) for name, side in sides.items() if name != "old"
        },
        "stage_ratios_new_over_old": {
            stage: round(sides["new"]["stage_seconds"][stage] / sides["old"]["stage_seconds"][stage], 3)
            for stage in STAGES
        },
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratio_new_over_old": result["ratio_new_over_old"], **result["stage_ratios_new_over_old"]}))


if __name__ == "__main__":
    main()
