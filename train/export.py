"""The export stage: a PEFT adapter folder plus a calibration card (JSON and Markdown)."""

from __future__ import annotations

import json
import shutil

from calibration.geometry import Geometry
from calibration.artifacts import atomic_directory
from train.report import card_markdown


def calibration_card(run) -> dict:
    geometry = Geometry.load(run.path("geometry"))
    results = json.loads((run.path("eval") / "results.json").read_text())
    organism = run.path("organism") / "organism.json"
    return {
        "model": run.model_args.model_name_or_path,
        "calibrated_model": run.model_reference,
        "calibrated_model_fingerprint": geometry.fingerprint,
        "organism": json.loads(organism.read_text()) if organism.exists() else None,
        "data_manifest": json.loads((run.path("data") / "manifest.json").read_text()),
        "targets": json.loads((run.path("sft_data") / "targets.json").read_text()),
        "geometry": {
            "layer": geometry.layer,
            "layer_scores": geometry.info.get("layer_scores"),
            "ranks_at_layer": {t: r[geometry.layer] for t, r in geometry.info.get("ranks", {}).items()},
            "groups": geometry.info.get("groups"),
        },
        "training": json.loads((run.path("train") / "train.json").read_text()),
        "evaluation": results,
    }


def stage_export(run) -> None:
    card = calibration_card(run)
    with atomic_directory(run.path("export")) as staging:
        shutil.copytree(run.path("train") / "adapter", staging / "adapter")
        (staging / "adapter" / "calibration_card.json").write_text(json.dumps(card, indent=2))
        (staging / "adapter" / "README.md").write_text(card_markdown(card))
