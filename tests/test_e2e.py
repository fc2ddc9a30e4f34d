"""The whole pipeline on a tiny model, with a user's own task cluster from a JSONL file beside the built-in
ones: its rows reach every stage, and the run ends with the summary table and the paths it wrote."""

from __future__ import annotations

import json

from datasets import load_from_disk

from refcal.calibration.geometry.directions import Geometry


def test_a_user_cluster_goes_through_every_stage(e2e):
    _, run_dir, _ = e2e
    recipe = load_from_disk(str(run_dir / "data" / "recipe"))
    user_rows = [r for split in recipe for r in recipe[split] if r["task"] == "household"]
    assert {r["kind"] for r in user_rows} == {"over_refusal", "harmful", "benign"}
    assert all(r["source"].endswith(tuple(f"household.jsonl#{i}" for i in range(1, 12))) for r in user_rows)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert any(
        name.endswith("household.jsonl") and len(info["sha256"]) == 64 for name, info in manifest["sources"].items()
    )

    assert "household" in Geometry.load(run_dir / "geometry").subspaces
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["after"]["by_task"]["over_refusal/household"]["n"] == 2
    card = json.loads((run_dir / "export" / "adapter" / "calibration_card.json").read_text())
    assert card["calibrate_tasks"] == ["sentiment", "cipher", "household"]


def test_every_stage_runs_its_models_on_the_runs_device(e2e):
    """The organism's base answers, geometry and layer choice, targets, the regularizer's references, eval
    before and after, the base model's answers and the KL: no inference forward of a model that was not loaded
    onto the process's device (tests/device_sentinel.py)."""
    _, run_dir, _ = e2e
    assert json.loads((run_dir.parent / "strays.json").read_text()) == []
    computed_on = json.loads((run_dir / "summary.json").read_text())["computed_on"]
    assert computed_on == {"device": "cpu", "processes": 1, "generation_dtype": "float32"}


def test_the_run_ends_with_a_table_and_the_paths_it_wrote(e2e):
    _, run_dir, _ = e2e
    out = (run_dir / "console.txt").read_text()
    assert "refusal rate" in out and "over_refusal" in out and "KL(before || after)" in " ".join(out.split())
    assert (
        f"adapter: {run_dir / 'export' / 'adapter'}; summary: {run_dir / 'summary.json'}; report: {run_dir / 'report.html'}"
        in out
    )
    assert (run_dir / "report.html").stat().st_size > 10_000  # `refcal run` writes the page too


def test_the_same_config_and_seed_give_the_same_adapter_bytes_end_to_end(e2e, tmp_path):
    """Data, organism (trained again, its own cache), geometry, targets and training are all deterministic on the CPU."""
    import subprocess
    import sys
    from pathlib import Path

    config, reference, env = e2e
    again = tmp_path / "again"
    command = [
        str(Path(sys.executable).with_name("refcal")),
        "run",
        "--config",
        str(config),
        "--run_dir",
        str(again),
        "--output_dir",
        str(again / "train"),
    ]
    done = subprocess.run(
        command, env={**env, "REFCAL_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = ("export", "adapter", "adapter_model.safetensors")
    assert again.joinpath(*adapter).read_bytes() == reference.joinpath(*adapter).read_bytes()
    assert json.loads((again / "eval" / "results.json").read_text()) == json.loads(
        (reference / "eval" / "results.json").read_text()
    )
    cards = [
        json.loads((run / "export" / "adapter" / "calibration_card.json").read_text()) for run in (reference, again)
    ]
    assert cards[0]["data_manifest"]["rows_hash"] == cards[1]["data_manifest"]["rows_hash"]
    assert cards[0]["environment"]["packages"]["torch"] and cards[0]["config"]["seeds"] == {"training": 42, "data": 0}


def test_a_geometry_measured_on_other_weights_is_refused_with_both_fingerprints(e2e, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    config, reference, env = e2e
    run_dir = tmp_path / "run"
    for stage in ("data", "organism", "geometry"):
        shutil.copytree(reference / stage, run_dir / stage)
    meta = json.loads((run_dir / "geometry" / "geometry.json").read_text())
    measured_on = meta["fingerprint"]
    meta["fingerprint"] = "0123456789abcdef"  # as if the cached organism had been rebuilt since
    (run_dir / "geometry" / "geometry.json").write_text(json.dumps(meta))
    command = [
        str(Path(sys.executable).with_name("refcal")),
        "train",
        "--config",
        str(config),
        "--run_dir",
        str(run_dir),
        "--output_dir",
        str(run_dir / "train"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "refcal: error:" in message and "0123456789abcdef" in message and measured_on in message
    assert not (run_dir / "sft_data").exists() and not (run_dir / "train").exists()  # nothing half-written


def test_a_failed_gate_withholds_the_export_after_the_table_and_sets_the_status(e2e, tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    config, reference, env = e2e
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    refcal = str(Path(sys.executable).with_name("refcal"))
    # a fraction above 1 fails every measure the model refused at all before calibration
    command = [refcal, "export", "--force", "--config", str(config), "--run_dir", str(run_dir),
               "--output_dir", str(run_dir / "train"), "--safety_gate_tolerance", "-1"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    out = " ".join(done.stderr.split())
    assert done.returncode == 3, done.stderr[-3000:]
    assert "refusal rate" in out and "safety gate: FAILED, export withheld on the validation half" in out
    assert "adapter: withheld by the safety gate" in out
    assert not (run_dir / "export").exists()
    gate = json.loads((run_dir / "gate.json").read_text())
    assert not gate["passed"] and gate["failed"]
    assert all(f"failed: {' '.join(failure.split())}" in out for failure in gate["failed"])  # each measure named
    assert "Safety gate" in (run_dir / "report.html").read_text()

    lenient = subprocess.run([*command, "--strict_gate", "false"], env=env, capture_output=True, text=True, timeout=300)
    assert lenient.returncode == 0 and "export withheld" in " ".join(lenient.stderr.split())


def test_the_guard_forms_train_on_a_finished_run(e2e, tmp_path):
    """The guard study's terms through `refcal train`: the keep term on harmful rows only, over every layer
    from the chosen one to the last on the prompt's tail, beside the onset term and the self-distillation
    guard; each term is logged and the record names the layers and the guarded rows."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    config, reference, env = e2e
    run_dir = tmp_path / "run"
    later = {"sft_data", "train", "eval", "export"}  # the stages this test runs again, at the top level only
    shutil.copytree(
        reference, run_dir, ignore=lambda folder, names: later & set(names) if folder == str(reference) else []
    )
    refcal = str(Path(sys.executable).with_name("refcal"))
    command = [refcal, "train", "--config", str(config), "--run_dir", str(run_dir), "--output_dir", str(run_dir / "ckpt"),
               "--objective", "target_free", "--onset_weight", "1", "--distill_weight", "1", "--keep_weight", "1",
               "--keep_rows", "should_refuse", "--regularizer_layers_to_last", "true", "--regularizer_positions", "tail",
               "--collapse_weight", "0", "--retain_weight", "0"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "train" / "train.json").read_text())
    layer = json.loads((run_dir / "geometry" / "geometry.json").read_text())["layer"]
    assert record["regularizer_layers"] == list(range(layer, 4))  # the tiny model has 4 layers
    rows = load_from_disk(str(run_dir / "sft_data" / "dataset")).to_list()
    assert record["distill_rows"] == sum(r["kind"] in ("harmful", "frame_attack") for r in rows) > 0
    steps = [e for e in json.loads((run_dir / "train" / "log_history.json").read_text()) if "loss" in e]
    assert all(
        any(term in e for e in steps) for term in ("loss/keep", "loss/onset", "loss/distill")
    )  # where rows have it
