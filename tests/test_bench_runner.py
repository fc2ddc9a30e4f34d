"""bench/runner.py and bench/pooling.py: a run folder reused while its settings are unchanged, and the pooled
refusal rate, as the studies use them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bench import calibration_table, calibration_variants, runner, seeds
from bench.pooling import pooled
from refcal.calibration.evaluation import wilson_rate


def test_settings_key_follows_the_flags_and_every_config_file(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    (tmp_path / "base.yaml").write_text("a: 1\n")
    (tmp_path / "form.yaml").write_text("b: 2\n")
    flags = ["--config", "form.yaml", "--seed", "0"]
    key = runner.settings_key(["base.yaml"], flags)
    assert len(key) == 16 and key == runner.settings_key(["base.yaml"], list(flags))
    assert key != runner.settings_key(["base.yaml"], flags[:2])
    (tmp_path / "form.yaml").write_text("b: 3\n")  # a config named among the flags changed
    assert key != runner.settings_key(["base.yaml"], flags)


def test_a_folder_is_reused_only_with_the_same_settings(tmp_path):
    lender = tmp_path / "lender"
    (lender / "data").mkdir(parents=True)
    (lender / "data" / "rows.jsonl").write_text("{}\n")
    run_dir = tmp_path / "runs" / "form"
    lend = {"data": lender / "data", "organism": lender / "organism"}  # the lender has no organism yet

    assert not runner.start(run_dir, {"key": "k1"}, notes={"flags": ["--x"]}, lend=lend)
    assert json.loads((run_dir / "bench.json").read_text()) == {"key": "k1", "flags": ["--x"]}
    assert (run_dir / "data" / "rows.jsonl").is_file() and not (run_dir / "organism").exists()

    (run_dir / "train").mkdir()
    assert runner.start(run_dir, {"key": "k1"}, lend=lend)  # notes are recorded, not compared
    assert (run_dir / "train").is_dir()

    assert not runner.start(run_dir, {"key": "k2"})  # other settings: made afresh
    assert sorted(p.name for p in run_dir.iterdir()) == ["bench.json"]


def test_a_folder_that_never_finished_is_made_afresh(tmp_path):
    run_dir = tmp_path / "form"
    assert not runner.start(run_dir, {"key": "k"}, finished="summary.json")
    assert not runner.made_with(run_dir, {"key": "k"}, finished="summary.json")
    assert not runner.start(run_dir, {"key": "k"}, finished="summary.json")
    (run_dir / "summary.json").write_text("{}")
    assert runner.start(run_dir, {"key": "k"}, finished="summary.json")


def test_variants_made_before_the_runner_stay_valid(tmp_path, monkeypatch):
    """calibration_variants' folders record the base run in base.json, written with an indent."""
    monkeypatch.setattr(calibration_variants, "ROOT", tmp_path)
    identity = {"rows_hash": "abc", "organism": "org", "layer": 22, "targets": {"sentiment": 1}}
    run_dir = tmp_path / "runs" / "variants" / "keep10_1ep"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "base.json").write_text(json.dumps(identity, indent=2))
    assert not calibration_variants.trained_on("keep10_1ep", identity)  # its eval never finished
    (run_dir / "eval" / "results.json").write_text("{}")
    assert calibration_variants.trained_on("keep10_1ep", identity)
    assert not calibration_variants.trained_on("keep10_1ep", {**identity, "layer": 21})


def test_a_seed_runs_its_lender_first(tmp_path, monkeypatch):
    monkeypatch.setattr(seeds, "RUNS", tmp_path)
    calls = []
    monkeypatch.setattr(
        seeds, "run_form", lambda seed, flags, target, lender: calls.append((target.name, lender)) or target
    )
    seeds.run(1, "plain_sft")
    assert calls == [(seeds.LENDER, None), ("plain_sft", tmp_path / "seed1" / seeds.LENDER)]


def test_pooled_rate_counts_every_group():
    groups = [wilson_rate(3, 10), wilson_rate(1, 5)]
    assert pooled(groups) == wilson_rate(4, 15)
    assert pooled(groups, interval=False) == {"rate": 0.2667, "refused": 4, "n": 15}
    assert pooled([]) is None


def test_the_table_pools_the_frames_it_has():
    block = {"by_kind": {}, "benchmarks": {}, "by_task": {"over_refusal/a": wilson_rate(3, 10)}}
    columns = calibration_table.columns(block, ["a", "missing"], ["missing"])
    assert columns["over_refusal_trained_frames"] == wilson_rate(3, 10)
    assert columns["over_refusal_untrained_frames"] is None


def test_variants_pool_every_task_they_name():
    block = {"over_refusal/a": wilson_rate(3, 10), "over_refusal/b": wilson_rate(1, 5)}
    assert calibration_variants.over_refusal(block, ["a", "b"])["rate"] == 0.2667
    with pytest.raises(KeyError):
        calibration_variants.over_refusal(block, ["a", "c"])


def test_a_study_stopped_by_sigterm_stops_the_run_it_started(tmp_path):
    """The run would otherwise go on writing in the study's folders (and on its CPU) after the study died."""
    pid_file = tmp_path / "run.pid"
    child = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    study = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from bench import runner; runner.run_to_the_end([sys.executable, '-c', {child!r}])",
        ],
        cwd=runner.ROOT,
    )
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    run_pid = int(pid_file.read_text())
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=30) == 128 + signal.SIGTERM
    while time.monotonic() < deadline:
        try:
            os.kill(run_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("the run outlived the study")
