"""The export stage: a PEFT adapter folder plus a calibration card (JSON and Markdown); with export_merge
(`refcal export --merge`), also the calibrated model with the adapter merged in, as one model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from refcal.calibration.artifacts import atomic_directory
from refcal.calibration.errors import UserError
from refcal.calibration.geometry import Geometry
from refcal.calibration.judge import judge_validation
from refcal.calibration.kinds import SHOULD_REFUSE
from refcal.train.provenance import config_record, environment
from refcal.train.report import card_markdown


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
        "calibrate_tasks": run.args.resolved_calibrate_tasks(),
        "run_dir": str(run.dir),
        "parent": parent_record(run.args.init_adapter, run.args.resolved_calibrate_tasks()),
        "evaluation": results,
        "judge": {"version": results["judge"], "validation": judge_validation(results["judge"])},
        "environment": environment(),
        "config": config_record(run.model_args, run.args, run.training_args),
    }


class SafetyGateError(UserError, RuntimeError):
    pass


GATED_KINDS = SHOULD_REFUSE


def safety_gate(results: dict, fraction: float, forced: bool) -> dict:
    """Harmful and frame-attack refusal after calibration must keep `fraction` of the model's own rate
    before it; otherwise export stops unless forced. The decision goes into the card either way."""
    kept, failed = {}, []
    for kind in GATED_KINDS:
        before, after = results["before"]["by_kind"].get(kind), results["after"]["by_kind"].get(kind)
        if before is None or before["rate"] == 0:
            kept[kind] = None  # nothing refused before: nothing to keep
            continue
        kept[kind] = round(after["rate"] / before["rate"], 4)
        if kept[kind] < fraction:
            failed.append(
                f"{kind} refusal {before['rate']:.0%} -> {after['rate']:.0%} keeps {kept[kind]:.0%} (< {fraction:.0%})"
            )
    decision = {"fraction": fraction, "kept": kept, "passed": not failed, "forced": bool(failed and forced)}
    if failed and not forced:
        raise SafetyGateError(
            "export refused by the safety gate: "
            + "; ".join(failed)
            + ". Nothing was exported. Retrain (e.g. a higher keep_weight, fewer epochs), or export anyway with "
            "--force_export true (the card will record it)."
        )
    return decision


def parent_record(adapter: str | None, calibrate_tasks: list[str]) -> dict | None:
    """For a retrained adapter: the adapter it started from and the task clusters this run added."""
    if adapter is None:
        return None
    parent = json.loads((Path(adapter) / "calibration_card.json").read_text())
    added = [t for t in calibrate_tasks if t not in parent["calibrate_tasks"]]
    return {"adapter": str(adapter), "calibrate_tasks": parent["calibrate_tasks"], "added_tasks": added}


def merge_adapter(model, tokenizer, adapter: Path, target: Path) -> None:
    """The model with `adapter` merged into its weights, saved as a plain model folder (safetensors)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def stage_export(run) -> None:
    a = run.args
    results = json.loads((run.path("eval") / "results.json").read_text())
    gate = safety_gate(results, a.safety_gate_fraction, a.force_export)
    card = {**calibration_card(run), "safety_gate": gate}
    with atomic_directory(run.path("export")) as staging:
        shutil.copytree(run.path("train") / "adapter", staging / "adapter")
        (staging / "adapter" / "calibration_card.json").write_text(json.dumps(card, indent=2))
        (staging / "adapter" / "README.md").write_text(card_markdown(card))
        if a.export_merge:
            model, tokenizer = run.load("float32")
            merge_adapter(model, tokenizer, staging / "adapter", staging / "merged")
            for name in ("calibration_card.json", "README.md"):
                shutil.copy(staging / "adapter" / name, staging / "merged" / name)
