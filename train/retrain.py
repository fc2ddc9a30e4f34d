"""`refcal retrain`: calibrate new task clusters on top of a shipped adapter.

    refcal retrain --config configs/demo_smollm2.yaml --adapter runs/demo/export/adapter \
        --tasks configs/tasks/grammar.yaml configs/tasks/summarisation.yaml --run_dir runs/demo-retrain

The new run trains the parent adapter further (not a fresh LoRA), on the old calibrated tasks and the new
ones: the new clusters' over-refusal subspaces join the collapse term and the old ones stay in it, and
the old tasks' rows are replayed so their calibration is kept. The parent's organism record is reused, so
the adapter continues on the model it was calibrated on. When the new run's data is the parent's (same task
files, sizes and seed: the rows hash matches), its geometry artifact is reused too, so the regularizer acts
at the same layer with the same reference; otherwise the geometry is measured again on the new rows. The card records the parent and the tasks added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from refcal.calibration.geometry.directions import FingerprintMismatch
from refcal.calibration.infra.artifacts import atomic_directory
from refcal.data_recipes.tasks import load_tasks

CARD = "calibration_card.json"


def parent_card(adapter: str | Path) -> dict:
    path = Path(adapter) / CARD
    if not path.is_file():
        raise SystemExit(f"refcal retrain: {adapter} has no {CARD}: give an adapter folder written by `refcal export`")
    card = json.loads(path.read_text())
    if "calibrate_tasks" not in card:
        raise SystemExit(
            f"refcal retrain: {path} predates task records (no calibrate_tasks): re-export it with `refcal export --force`"
        )
    return card


def retrain_overrides(
    card: dict, adapter: str, new_task_files: list[str], task_files: list[str], run_dir: str
) -> list[str]:
    """Command-line overrides that turn the parent's config into the retraining run."""
    new = [task.name for task in load_tasks(new_task_files)]
    already = sorted(set(new) & set(card["calibrate_tasks"]))
    if already:
        raise SystemExit(f"refcal retrain: {already} already calibrated by {adapter}; --tasks takes new clusters only")
    files = list(dict.fromkeys(str(Path(f).resolve()) for f in [*task_files, *new_task_files]))
    return [
        "--init_adapter",
        str(adapter),
        "--tasks",
        *files,
        "--calibrate_tasks",
        *card["calibrate_tasks"],
        *new,
        "--run_dir",
        run_dir,
        "--output_dir",
        str(Path(run_dir) / "train"),
    ]


def check_adapter_base(adapter: str, model_fingerprint: str) -> None:
    """An adapter is continued only on the model it was calibrated on."""
    card = json.loads((Path(adapter) / "calibration_card.json").read_text())
    if card["calibrated_model_fingerprint"] != model_fingerprint:
        raise FingerprintMismatch(
            f"adapter {adapter} was calibrated on model {card['calibrated_model_fingerprint']}, "
            f"not on this run's model ({model_fingerprint})"
        )


def reuse_parent_stages(run, card: dict) -> list[str]:
    """Copy the parent's organism record (the adapter continues on the model it was calibrated on; an
    organism trained on the new rows would be another model), and its geometry too when the new data is the
    parent's; returns the stages copied."""
    parent_dir = Path(card["run_dir"])
    manifest = json.loads((run.path("data") / "manifest.json").read_text())
    same_rows = manifest["rows_hash"] == card["data_manifest"]["rows_hash"]
    stages = ["organism", "geometry"] if same_rows else ["organism"]
    copied = [stage for stage in stages if (parent_dir / stage).is_dir() and not run.done(stage)]
    for stage in copied:
        with atomic_directory(run.path(stage)) as staging:
            shutil.copytree(parent_dir / stage, staging, dirs_exist_ok=True)
    return copied
