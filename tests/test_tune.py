"""train/stages/tune.py: the choice among trials, the search space's checks, and `refcal tune` end to end on
the tiny model: trials in a study that resumes, shared by two workers, with its table, plot and report."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from refcal.calibration.infra.errors import UserError
from refcal.train.config import RefcalArguments
from refcal.train.stages.tune import calibrated_rows, choose, reseed, search_space


def trial(number: int, over: float, did: float, passed: bool = True, kl: float = 0.1) -> dict:
    scores = {"over_refusal": over, "did_task": did, "gate_passed": passed, "kl_benign": kl}
    return {"number": number, "settings": {}, "folder": "", "scores": scores}


def test_the_choice_is_feasible_on_the_pareto_front_with_the_best_margin_then_the_lower_kl():
    trials = [
        trial(0, over=0.0, did=0.9, passed=False),  # the best by far, but the gate failed it
        trial(1, over=0.2, did=0.5),
        trial(2, over=0.3, did=0.4),  # dominated by 1
        trial(3, over=0.1, did=0.4, kl=0.3),  # 0.3 margin, as trial 4
        trial(4, over=0.2, did=0.5, kl=0.05),  # the same scores as 1, at a lower KL
    ]
    assert choose(trials)["number"] == 4
    assert choose([trial(0, 0.0, 1.0, passed=False)]) is None


def test_a_validation_half_without_a_calibrated_task_stops_the_tune():
    """Trials chosen on a half that lacks a calibrated task would be judged on it only on the test half."""
    run = SimpleNamespace(args=RefcalArguments(calibrate_tasks=["translation", "lookalike"]))
    row = lambda kind, task: {"kind": kind, "task": task}  # noqa: E731
    half = [row("over_refusal", "translation"), row("harmful", "lookalike"), row("over_refusal", "grammar")]
    with pytest.raises(UserError, match=r"calibrated task\(s\) lookalike .*lookalike_sizes"):
        calibrated_rows(run, half)
    assert calibrated_rows(run, [*half, row("over_refusal", "lookalike")]) == [0, 3]


def test_a_resumed_study_draws_new_settings_and_the_same_history_draws_the_same(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"

    def first_draws(n: int) -> list[float]:
        study = optuna.create_study(study_name="s", storage=url, directions=["minimize"], load_if_exists=True)
        reseed(study, 0)
        draws = []
        for _ in range(n):
            trial = study.ask()
            trial.set_user_attr("constraint", 0.0)
            draws.append(trial.suggest_float("lr", 1e-5, 1e-2, log=True))
            study.tell(trial, 0.5)
            reseed(study, 0)
        return draws

    started = first_draws(3)
    resumed = first_draws(3)  # a killed tune opened again: a sampler seeded with 0 alone repeats `started`
    assert len(set(started + resumed)) == 6
    (tmp_path / "study.db").unlink()
    assert first_draws(3) == started


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tune_learning_rates", [1e-3], "two positive numbers, low then high"),
        ("tune_onset_weights", [2.0, 1.0], "two positive numbers, low then high"),
        ("tune_lora_ranks", [], "at least one value"),
        ("tune_trials", 0, "at least 1"),
        ("tune_objectives", ["target_free", "steered"], "one or more of target_free, helpful, sft, dpo"),
    ],
)
def test_a_bad_search_space_names_its_field(field, value, message):
    with pytest.raises(UserError, match=f"'{field}'.*{message}"):
        search_space(RefcalArguments(**{field: value}))


ROOT = Path(__file__).resolve().parent.parent


def tune(config: Path, run_dir: Path, env: dict, trials: int, as_stage: bool = False) -> subprocess.Popen:
    """`refcal tune --trials N`, or with as_stage `refcal run` on a config that sets tune: true."""
    how = ["run", "--tune", "true", "--tune_trials", str(trials)] if as_stage else ["tune", "--trials", str(trials)]
    command = [sys.executable, "-m", "refcal.train.cli", how[0], "--config", str(config), "--run_dir", str(run_dir),
               "--output_dir", str(run_dir / "train"), *how[1:],
               "--tune_epochs", "0.25", "0.5", "--tune_lora_ranks", "2", "4",
               # a val row of over_refusal per task, which the e2e config leaves out: trials are scored on them
               "--over_refusal_per_task", "2", "1", "1"]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-4000:]
    return out + err


def complete_trials(run_dir: Path) -> list[int]:
    with sqlite3.connect(run_dir / "tune" / "study.db") as db:
        return sorted(n for (n,) in db.execute("SELECT number FROM trials WHERE state = 'COMPLETE'"))


def test_tune_searches_resumes_and_shares_its_study(e2e, tmp_path):
    config, _, env = e2e
    run_dir = tmp_path / "tuned"

    console = finish(tune(config, run_dir, env, trials=2, as_stage=True))
    report = json.loads((run_dir / "tune" / "tune.json").read_text())
    assert [t["number"] for t in report["trials"]] == [0, 1] and complete_trials(run_dir) == [0, 1]
    assert report["chosen"] == choose(report["trials"])["number"]  # the e2e gate's tolerance passes every trial
    for t in report["trials"]:
        assert t["settings"]["num_train_epochs"] in (0.25, 0.5) and t["settings"]["lora_r"] in (2, 4)
        assert set(t["scores"]) >= {
            "over_refusal",
            "did_task",
            "kl_benign",
            "harmful_kept",
            "gate_passed",
            "constraint",
        }
        assert (Path(t["folder"]) / "train" / "adapter" / "adapter_model.safetensors").is_file()
        assert not (Path(t["folder"]) / "eval").exists() or t["number"] == report["chosen"]  # test half: chosen only
        built = json.loads((Path(t["folder"]) / "sft_data" / "targets.json").read_text())
        assert built["objective"] == t["settings"]["objective"] in ("target_free", "helpful")
        assert (run_dir / "tune" / f"sft_data-{built['objective']}" / "targets.json").is_file()  # for later trials
    chosen = report["test_half"]["chosen"]
    assert chosen["exported"] and (Path(chosen["run_dir"]) / "export" / "adapter").is_dir()
    assert report["test_half"]["default_form"]["run_dir"] == str(run_dir)
    assert (run_dir / "tune" / "pareto.png").stat().st_size > 1000
    assert "refcal tune: trials on the validation half" in console and "(chosen)" in console
    assert "<h2>Tune</h2>" in (run_dir / "report.html").read_text()

    # killed after two trials, or asked for more: the finished ones stay, only the missing one runs
    finish(tune(config, run_dir, env, trials=3))
    again = json.loads((run_dir / "tune" / "tune.json").read_text())
    assert again["trials"][:2] == report["trials"] and complete_trials(run_dir) == [0, 1, 2]

    # two workers on one study: together they finish the trials asked for (each may finish one more that was
    # running when the other reached the count), never the same trial twice
    workers = [tune(config, run_dir, env, trials=6) for _ in range(2)]
    for worker in workers:
        finish(worker)
    numbers = complete_trials(run_dir)
    assert 6 <= len(numbers) <= 7 and len(set(numbers)) == len(numbers)
