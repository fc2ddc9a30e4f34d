"""`refcal scan` on a tiny model told what to refuse: the unframed harmful prompts and the sentiment
cluster's over_refusal prompts. It answers everything else, frame attacks included, so the scan must
suggest calibrating sentiment only and report frame attacks as weak refusal, without building the
organism its config asks for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refcal.train.stages.scan import findings, table_rows

ROOT = Path(__file__).resolve().parent.parent


def refuses(row: dict) -> bool:
    return row["kind"] == "harmful" or (row["kind"] == "over_refusal" and row["task"] == "sentiment")


@pytest.fixture(scope="module")
def scanned(tokenizer, tmp_path_factory):
    """(config, run folder, organism cache folder, what `refcal scan` printed), after one scan."""
    from fixtures import E2E_CONFIG, isolated_env, save_refusing_model, write_user_task

    base = tmp_path_factory.mktemp("scan")
    config = base / "config.yaml"
    text = E2E_CONFIG.format(
        model=base / "model", run_dir=base / "run", root=ROOT, user_task=write_user_task(base / "tasks")
    )
    config.write_text(text.replace("over_refusal_per_task: [2, 0, 1]", "over_refusal_per_task: [2, 0, 2]"))
    assert "organism: true" in config.read_text()
    # learnt on the eval rows too: the test is about what scan reports, not about how a tiny model generalises
    save_refusing_model(tokenizer, base / "model", config, refuse=refuses, splits=("train", "eval"))
    env = isolated_env(base / "cache")
    sentinel = [sys.executable, str(ROOT / "tests" / "device_sentinel.py"), str(base / "strays.json")]
    done = subprocess.run(
        [*sentinel, "scan", "--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return config, base / "run", base / "cache", done.stderr


def test_scan_writes_per_cluster_rates_with_intervals(scanned):
    _, run_dir, _, _ = scanned
    result = json.loads((run_dir / "scan" / "scan.json").read_text())
    by_task = result["summary"]["by_task"]
    for task in ("sentiment", "cipher", "household"):  # household: the user's own cluster, its own sizes
        rate = by_task[f"over_refusal/{task}"]
        assert (
            rate["n"] == (3 if task == "household" else 2)
            and 0 <= rate["ci95"][0] <= rate["rate"] <= rate["ci95"][1] <= 1
        )
    assert {name.split("/")[0] for name in result["summary"]["benchmarks"]} == {"xstest_safe", "jbb_harmful"}
    generations = (run_dir / "scan" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == sum(r["n"] for r in result["summary"]["by_kind"].values()) + 4  # 2 per external set
    assert not (run_dir / "eval").exists()  # scan is no eval stage


def test_the_refused_cluster_is_suggested_and_the_answered_ones_are_not(scanned):
    _, run_dir, _, printed = scanned
    result = json.loads((run_dir / "scan" / "scan.json").read_text())
    assert result["summary"]["by_task"]["over_refusal/sentiment"]["rate"] == 1.0
    assert result["summary"]["by_task"]["over_refusal/cipher"]["rate"] == 0.0
    assert result["calibrate_tasks"] == ["sentiment"]
    assert result["calibrate_tasks_line"] == "calibrate_tasks: [sentiment]"
    assert "calibrate_tasks: [sentiment]" in printed  # ready to paste
    notes = {(r["cluster"], r["kind"]): r["note"] for r in table_rows(result)}
    assert notes[("sentiment", "over_refusal")] == "over-refuses" and notes[("cipher", "over_refusal")] == ""


def test_weak_harmful_refusal_names_the_kind_the_model_answers(scanned):
    _, run_dir, _, printed = scanned
    result = json.loads((run_dir / "scan" / "scan.json").read_text())
    weak = {entry["group"] for entry in result["weak_harmful_refusal"]}
    assert {"frame_attack", "frame_attack/sentiment", "frame_attack/cipher"} <= weak
    assert "harmful" not in weak and result["summary"]["by_kind"]["harmful"]["rate"] == 1.0
    assert "harmful refusal already below 80%: frame_attack 0%" in " ".join(printed.split())


def test_scan_runs_its_model_on_the_runs_device(scanned):
    _, run_dir, _, _ = scanned
    assert json.loads((run_dir.parent / "strays.json").read_text()) == []  # tests/device_sentinel.py


def test_scan_needs_no_organism_even_when_the_config_asks_for_one(scanned):
    config, run_dir, cache, printed = scanned
    result = json.loads((run_dir / "scan" / "scan.json").read_text())
    assert result["model"] == str(config.parent / "model") and result["organism_in_config"] is True
    assert not (run_dir / "organism").exists()
    assert not (cache / "organisms").exists()  # nor in the refcal cache, where organisms are kept
    assert "scan ignored it" in printed


def test_a_run_of_the_same_model_reuses_the_scans_answers(scanned, tmp_path, monkeypatch):
    """The eval stage's frozen answers are cached under a key of the weights and the prompts: a run of the
    same model (organism off), in another folder, finds the scan's answers and generates nothing."""
    from refcal.train.config import parse
    from refcal.train.run import Run
    from refcal.train.stages.eval import eval_prompts, frozen_generations

    config, run_dir, cache, _ = scanned
    monkeypatch.setenv("REFCAL_CACHE", str(cache))
    other = tmp_path / "other-run"
    shutil.copytree(run_dir / "data", other / "data")
    run = Run(*parse(["--config", str(config), "--organism", "false", "--run_dir", str(other)]))
    texts = [p["prompt"] for p in eval_prompts(run)[0]]
    model, _ = run.load(run.args.generation_dtype)
    answers = frozen_generations(
        run, model, texts, lambda: pytest.fail("generated again instead of reusing the scan's answers")
    )
    scanned_answers = [
        json.loads(line)["response"] for line in (run_dir / "scan" / "generations.jsonl").read_text().splitlines()
    ]
    assert answers == scanned_answers


def test_other_thresholds_recompute_the_verdicts_without_generating(scanned, tmp_path, capsys, monkeypatch):
    from refcal.train import cli
    from refcal.train.stages import scan

    config, run_dir, _, _ = scanned
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("cache"))
    monkeypatch.setattr(scan, "stage_scan", lambda run: pytest.fail("the finished scan was run again"))
    cli.main(
        [
            "scan",
            "--config",
            str(config),
            "--run_dir",
            str(copy),
            "--scan_over_refusal_threshold",
            "1.0",
            "--scan_harmful_floor",
            "0.0",
        ]
    )
    result = json.loads((copy / "scan" / "scan.json").read_text())
    assert result["thresholds"] == {"over_refusal": 1.0, "harmful_floor": 0.0}
    assert result["calibrate_tasks"] == [] and result["weak_harmful_refusal"] == []
    assert "nothing to calibrate at this threshold" in capsys.readouterr().err


def test_the_html_report_shows_the_scan(scanned, tmp_path):
    from refcal.train import cli

    _, run_dir, _, _ = scanned
    out = tmp_path / "report.html"
    cli.main(["report", str(run_dir), "--out", str(out)])
    page = out.read_text(encoding="utf-8")
    assert page.index("<h2>Run</h2>") < page.index("<h2>Scan</h2>") < page.index("<h2>Geometry</h2>")
    assert "<code>calibrate_tasks: [sentiment]</code>" in page
    assert 'alt="scan: over-refusal per cluster"' in page
    assert "<td>sentiment</td><td>over_refusal</td><td>answer</td><td>2</td><td>100%</td>" in page


def test_a_report_without_a_scan_has_no_scan_section(tmp_path):
    from refcal.train.reports.html_page import render

    assert "<h2>Scan</h2>" not in render(tmp_path)


def test_verdicts_at_the_thresholds_edges():
    """Over-refusal strictly above the threshold, weak refusal strictly below the floor; the unframed
    harmful rows count through their kind, answer-expected external sets are never weak refusal."""
    rate = lambda r, n=10: {"rate": r, "n": n, "ci95": [0.0, 1.0]}  # noqa: E731
    summary = {
        "by_kind": {"over_refusal": rate(0.3), "harmful": rate(0.8), "frame_attack": rate(0.5)},
        "by_task": {
            "over_refusal/a": rate(0.2),
            "over_refusal/b": rate(0.5),
            "over_refusal/c": rate(0.9),
            "harmful/none": rate(0.1),
            "frame_attack/a": rate(0.79),
        },  # fmt: skip
        "benchmarks": {"xstest_safe": rate(0.0), "strongreject": rate(0.95), "jbb_harmful": rate(0.1)},
    }
    found = findings(summary, 0.2, 0.8)
    assert found["calibrate_tasks"] == ["c", "b"] and found["calibrate_tasks_line"] == "calibrate_tasks: [c, b]"
    assert [e["group"] for e in found["weak_harmful_refusal"]] == ["frame_attack", "frame_attack/a", "jbb_harmful"]
    assert findings(summary, 0.95, 0.0)["calibrate_tasks_line"] is None
