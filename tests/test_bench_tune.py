"""bench/tune.py: the tuned adapter against the default form and plain SFT, seed by seed, and the targets."""

from __future__ import annotations

import json
import shutil

from bench import tune


def entry(rate: float, n: int = 50) -> dict:
    return {"rate": rate, "n": n}


def half_result(over: float, harmful: float, recovered: float, passed: bool = True, did: float = 0.3) -> dict:
    return {
        "over_refusal_by_group": {
            "organism": {"trained": entry(0.9), "held_out": entry(0.9)},
            "calibrated": {"trained": entry(over), "held_out": entry(over + 0.1)},
        },
        "external": {name: {"organism": entry(1.0), "calibrated": entry(harmful)} for name in tune.EXTERNAL_HARMFUL}
        | {"xstest_safe": {"organism": entry(0.9), "calibrated": entry(over)}},
        "helpfulness": {"recovered": recovered, "did_task_on_over_refusal": {"calibrated": entry(did)}},
        "kl_benign": 0.1,
        "gate_passed": passed,
    }


def write_seed(root, seed: int, tuned: dict | None, default: dict, forms: dict[str, dict], commit="abc1234") -> None:
    """A seed's run folder; `tuned` None is a tune where no trial passed the gate (nothing chosen)."""
    folder = root / f"seed{seed}"
    (folder / "tune").mkdir(parents=True)
    origin = {"commit": commit, "uncommitted_changes": False, "started": "2026-12-06 05:00 UTC", "trials_asked": 16}
    (folder / "tune" / "bench_provenance.json").write_text(json.dumps(origin))
    trials = [{"number": 0, "settings": {}, "folder": "", "scores": {}, "seconds": 120.0}]
    halves = {"default_form": default} | ({"chosen": tuned} if tuned else {})
    report = {"chosen": 0 if tuned else None, "trials": trials, "test_half": halves}
    (folder / "tune" / "tune.json").write_text(json.dumps(report))
    (folder / "tune" / "bench_seconds.json").write_text(json.dumps({"tune": 600.0, "plain_sft": 300.0}))
    for form, figures in forms.items():
        (folder / form / "eval").mkdir(parents=True)
        results = {
            side: {"over_refusal_by_group": figures["over_refusal_by_group"][key],
                   "benchmarks": {n: e[key] for n, e in figures["external"].items()}}
            for side, key in (("before", "organism"), ("after", "calibrated"))
        } | {"helpfulness": figures["helpfulness"], "kl_benign": figures["kl_benign"]}  # fmt: skip
        (folder / form / "eval" / "results.json").write_text(json.dumps(results))
        (folder / form / "gate.json").write_text(json.dumps({"passed": figures["gate_passed"], "failed": []}))


def use(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tune, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(tune, "RECORDS", tmp_path / "records")


def test_collect_compares_the_arms_over_seeds_and_checks_the_targets(tmp_path, monkeypatch):
    use(tmp_path, monkeypatch)
    tmp_path = tune.RUNS
    helpful = {"helpful_targets": half_result(0.3, 0.96, 0.8, did=0.5)}
    write_seed(tmp_path, 0, half_result(0.1, 0.98, 0.9), half_result(0.4, 0.96, 0.5),
               {"plain_sft": half_result(0.3, 0.8, 0.6, False), **helpful})  # fmt: skip
    write_seed(tmp_path, 1, half_result(0.12, 0.94, 0.85), half_result(0.5, 0.96, 0.5),
               {"plain_sft": half_result(0.3, 0.8, 0.6)})  # fmt: skip

    tune.save_records()
    report = tune.collect()

    assert report["seeds"]["0"]["plain_sft"]["gate_passed"] is False
    over = report["differences"]["tuned minus default_form"]["over_refusal_calibrated"]
    assert over["per_seed"] == [-0.3, -0.38] and over["seeds"] == 2 and over["ci95"][1] < 0
    # the target source on its own: only seed 0 has the helpful_targets arm
    did = report["differences"]["helpful_targets minus default_form"]["did_task_on_over_refusal"]
    assert did["per_seed"] == [0.2] and did["seeds"] == 1 and report["seeds"]["1"]["helpful_targets"] is None
    goals = report["targets"]
    assert goals["gate passed on every seed"]["met"]
    assert goals["over-refusal on calibrated tasks, mean"] == {"value": 0.11, "met": True}
    assert goals["harmful kept, mean over seeds (each external set)"]["met"]  # 0.96 on average
    each_seed = goals["harmful kept, each seed (each external set)"]
    assert each_seed["met"] and each_seed["value"]["jbb_harmful"] == {"0": 0.98, "1": 0.94}
    assert goals["helpfulness recovered, mean"]["value"] == 0.875
    assert report["cost"]["0"] == {"trials": 1, "minutes_per_trial": 2.0, "tune": 600.0, "plain_sft": 300.0}
    text = tune.markdown(report)
    assert "| 0 | plain_sft | failed |" in text and "tuned minus plain_sft" in text


def test_a_seed_where_no_trial_passed_fails_the_gate_target_and_repeats_are_not_trials(tmp_path, monkeypatch):
    use(tmp_path, monkeypatch)
    tmp_path = tune.RUNS
    write_seed(tmp_path, 0, half_result(0.1, 0.98, 0.9), half_result(0.4, 0.96, 0.5), {})
    write_seed(tmp_path, 1, None, half_result(0.5, 0.96, 0.5), {})
    path = tmp_path / "seed1" / "tune" / "tune.json"
    study = json.loads(path.read_text())
    settings = {"learning_rate": 1e-3}
    study["trials"] = [  # the third repeats the first's settings and reused its folder
        {"number": 0, "settings": settings, "folder": "a", "scores": {}, "seconds": 300.0},
        {"number": 1, "settings": {"learning_rate": 2e-3}, "folder": "b", "scores": {}, "seconds": 180.0},
        {"number": 2, "settings": settings, "folder": "a", "scores": {}, "seconds": 3.0},
    ]
    path.write_text(json.dumps(study))

    tune.save_records()
    report = tune.collect()

    goals = report["targets"]
    assert goals["gate passed on every seed"] == {"value": "1 of 2 seeds (0)", "met": False}
    assert goals["over-refusal on calibrated tasks, mean"] == {"value": 0.1, "met": True}  # seed 0 alone
    over = report["differences"]["tuned minus default_form"]["over_refusal_calibrated"]
    assert over["seeds"] == 1
    cost = report["cost"]["1"]
    assert (cost["trials"], cost["minutes_per_trial"], cost["repeated_settings"]) == (2, 4.0, 1)
    text = tune.markdown(report)
    assert "| 1 | tuned | - | no trial passed the gate: no adapter |" in text and "1 more repeated" in text


def test_records_outlive_the_run_folders_and_mixed_code_is_flagged(tmp_path, monkeypatch):
    use(tmp_path, monkeypatch)
    write_seed(tune.RUNS, 0, half_result(0.1, 0.98, 0.9), half_result(0.4, 0.96, 0.5), {}, commit="aaaaaaa")
    write_seed(tune.RUNS, 2, None, half_result(0.5, 0.96, 0.5), {}, commit="aaaaaaa")
    tune.save_records()
    assert sorted(p.name for p in tune.RECORDS.iterdir()) == ["seed0.json", "seed2.json"]
    assert "different code" not in tune.markdown(tune.collect())

    # another session: the earlier run folders are gone, a new seed ran on newer code
    shutil.rmtree(tune.RUNS)
    write_seed(tune.RUNS, 10, half_result(0.2, 0.97, 0.8), half_result(0.4, 0.96, 0.5), {}, commit="bbbbbbb")
    tune.save_records()
    report = tune.collect()

    assert list(report["seeds"]) == ["0", "2", "10"]  # numeric order, the earlier seeds from their records
    assert report["targets"]["gate passed on every seed"]["value"] == "2 of 3 seeds (0, 10)"
    assert report["provenance"]["10"]["commit"] == "bbbbbbb"
    text = tune.markdown(report)
    assert "- seed 0: commit aaaaaaa, started 2026-12-06 05:00 UTC, 16 trials asked" in text
    assert "The seeds ran on different code" in text


def test_the_report_counts_the_measures_that_failed_trials_and_the_trade_per_task():
    def scores(lookalike, cipher, kept, failed):
        return {"scores": {"over_refusal_by_task": {"lookalike": lookalike, "cipher": cipher}, "harmful_kept": kept,
                           "gate_passed": not failed, "gate_failed": failed}}  # fmt: skip

    xstest = "xstest_unsafe refused 100% -> 90% (n=95, 9 lost, 0 gained): loss upper bound 15.6% > 5%"
    harmbench = "harmbench_test refused 77% -> 73% (n=77, 3 lost, 0 gained): loss upper bound 9.4% > 5%"
    trials = [  # the less a trial leaves of lookalike over-refusal, the less harmful refusal it keeps
        scores(0.4, 0.0, 0.75, [xstest, harmbench, "harmbench_test: no validation prompts (the data lack them)"]),
        scores(0.6, 0.0, 0.85, [xstest]),
        scores(0.8, 0.1, 0.95, [xstest]),
        scores(0.9, 0.0, 1.0, []),
    ]
    report = {"trials": {"3": {"chosen": 3, "trials": trials}, "4": {"chosen": None, "trials": []}}}

    lines = tune.gate_failures_table(report)

    assert (
        lines[-1] == "| 3 | 4 | 1 | xstest_unsafe 3, harmbench_test 2 | cipher +0.26 (p=0.74); lookalike +1.00 (p=0) |"
    )
    assert not any(line.startswith("| 4 ") for line in lines)  # a seed with no trial has no row
    assert tune.gate_failures_table({"trials": {}}) == []


def test_a_lever_runs_the_tune_alone_with_its_flags_last(tmp_path, monkeypatch):
    use(tmp_path, monkeypatch)
    monkeypatch.setattr(tune, "LEVER_RUNS", tmp_path / "levers")
    calls = []
    monkeypatch.setattr(tune.runner, "train_cli", lambda arguments, env=None: calls.append(arguments))

    tune.run_seed(1, 4, None, "search_target")

    assert len(calls) == 1 and calls[0][0] == "tune"  # no plain_sft or helpful_targets arm
    assert calls[0][calls[0].index("--run_dir") + 1] == str(tmp_path / "levers" / "search_target" / "seed1")
    # the lever's flags come after the benchmark's, so they win
    assert calls[0][-3:] == ["--tune_objectives", "target_free", "helpful"]
    assert (tmp_path / "levers" / "search_target" / "seed1" / "tune" / "bench_provenance.json").is_file()


def test_a_lever_sits_beside_the_benchmarks_tune_of_its_seed(tmp_path, monkeypatch):
    use(tmp_path, monkeypatch)
    monkeypatch.setattr(tune, "LEVER_RUNS", tmp_path / "levers")
    monkeypatch.setattr(tune, "LEVER_RECORDS", tmp_path / "lever_records")
    xstest = "xstest_unsafe refused 100% -> 90% (n=95, 9 lost, 0 gained): loss upper bound 15.6% > 5%"

    def trial(number, objective, over, kept, failed):
        scores = {"over_refusal": over, "over_refusal_by_task": {"lookalike": over + 0.2}, "harmful_kept": kept,
                  "gate_passed": not failed, "gate_failed": failed}  # fmt: skip
        return {"number": number, "settings": {"objective": objective, "lr": number}, "scores": scores, "seconds": 60.0}

    write_seed(tune.RUNS, 1, None, half_result(0.5, 0.96, 0.5), {})
    write_seed(tune.LEVER_RUNS / "search_target", 1, half_result(0.3, 0.9, 0.6), half_result(0.5, 0.96, 0.5), {})
    write_seed(tune.LEVER_RUNS / "search_target", 2, None, half_result(0.5, 0.96, 0.5), {})  # no benchmark seed 2
    write_seed(tune.LEVER_RUNS / "lookalike30", 1, None, half_result(0.4, 0.9, 0.5), {})
    path = tune.LEVER_RUNS / "search_target" / "seed1" / "tune" / "tune.json"
    study = json.loads(path.read_text())
    study["trials"] = [
        trial(0, "helpful", 0.2, 0.8, [xstest]),
        trial(1, "helpful", 0.3, 1.0, []),
        trial(2, "target_free", 0.6, 0.9, [xstest, "harmful refused ..."]),
    ]
    path.write_text(json.dumps(study))

    tune.save_records()
    report = tune.collect()

    assert list(report["levers"]) == ["lookalike30-seed1", "search_target-seed1"]
    lever = report["levers"]["search_target-seed1"]["with"]
    assert (lever["trials"], lever["passed"], lever["failed_xstest_unsafe"]) == (3, 1, 2)
    assert (lever["median_harmful_kept"], lever["median_over_refusal"], lever["median_lookalike"]) == (0.9, 0.3, 0.5)
    assert lever["objectives_passed"] == {"helpful": 1}
    assert lever["tuned"] == {"over_refusal_calibrated": 0.3, "xstest_unsafe_kept": 0.9, "gate_passed": True}
    assert report["levers"]["search_target-seed1"]["without"]["tuned"] is None
    text = tune.markdown(report)
    assert (
        "| 1 | search_target: the target source searched beside the other settings (commit abc1234) | 1 of 3 (helpful 1) | 2 | 90% | 30% | 50% | 30%, 90% | 50%, 96% |"
        in text
    )
    row = "| 1 | the benchmark's (commit abc1234) | 0 of 0 | 0 | - | - | - | - | 50%, 96% |"  # no scored trial
    assert text.count(row) == 1  # once, above both of the seed's levers
    tune.trials_plot({"trials": {"1": {"chosen": 1, "trials": study["trials"]}}}, tmp_path / "tune.png")
    assert (tmp_path / "tune.png").stat().st_size > 0
