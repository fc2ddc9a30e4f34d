"""The whole pipeline on a tiny model, with a user's own task cluster from a JSONL file beside the built-in
ones: its rows reach every stage, and the run ends with the summary table and the paths it wrote."""

from __future__ import annotations

import json

from calibration.geometry import Geometry
from datasets import load_from_disk


def test_a_user_cluster_goes_through_every_stage(e2e):
    _, run_dir, _ = e2e
    recipe = load_from_disk(str(run_dir / "data" / "recipe"))
    user_rows = [r for split in recipe for r in recipe[split] if r["task"] == "household"]
    assert {r["kind"] for r in user_rows} == {"over_refusal", "harmful", "benign"}
    assert all(r["source"].endswith(tuple(f"household.jsonl#{i}" for i in range(1, 12))) for r in user_rows)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert any(name.endswith("household.jsonl") and len(info["sha256"]) == 64 for name, info in manifest["sources"].items())

    assert "household" in Geometry.load(run_dir / "geometry").subspaces
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["after"]["by_task"]["over_refusal/household"]["n"] == 2
    card = json.loads((run_dir / "export" / "adapter" / "calibration_card.json").read_text())
    assert card["calibrate_tasks"] == ["sentiment", "cipher", "household"]


def test_the_run_ends_with_a_table_and_the_paths_it_wrote(e2e):
    _, run_dir, _ = e2e
    out = (run_dir / "console.txt").read_text()
    assert "refusal rate" in out and "over_refusal" in out and "KL(before || after)" in " ".join(out.split())
    assert f"adapter: {run_dir / 'export' / 'adapter'}; summary: {run_dir / 'summary.json'}" in out
