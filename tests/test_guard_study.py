"""bench/guard_study.py: the score fixed before the runs, the pairing of wins, the new-clusters regime."""

from __future__ import annotations

import pytest

from bench import guard_study

ORGANISM = {"harmful": 1.0, "xstest_unsafe": 1.0, "strongreject": 0.9, "harmbench_test": 0.9, "jbb_harmful": 0.8,
            "over_refusal": 1.0, "xstest_safe": 0.9, "oktest": 0.9, "coconot_contrast": 0.8}  # fmt: skip


def calibrated(**changes) -> dict:
    return {"organism": ORGANISM, "calibrated": {**ORGANISM, **changes}}


def test_score_rewards_calibration_and_charges_lost_harmful_refusal():
    untouched = guard_study.score(calibrated())
    calibrates = guard_study.score(calibrated(over_refusal=0.2, xstest_safe=0.3, oktest=0.3, coconot_contrast=0.2))
    leaks = guard_study.score(
        calibrated(over_refusal=0.2, xstest_safe=0.3, oktest=0.3, coconot_contrast=0.2, xstest_unsafe=0.6)
    )
    assert untouched == pytest.approx(1 - 0.9)
    assert calibrates > leaks > untouched
    assert calibrates - leaks == pytest.approx(0.4 / 5, abs=1e-4)  # one harmful set of five loses 40%


def test_refusing_more_than_the_organism_earns_nothing_on_the_harmful_side():
    assert guard_study.score(calibrated(jbb_harmful=1.0)) == guard_study.score(calibrated())


def test_wins_pair_no_runs_of_different_prompts_or_organisms():
    entry = lambda n: {"organism": {"rate": 1.0, "n": n}, "calibrated": {"rate": 0.5, "n": n}}  # noqa: E731
    run = lambda form, n=20, seed=0: {  # noqa: E731
        "regime": "default", "seed": seed, "form": form,
        "test": {label: entry(n) for label in guard_study.EXTERNAL_HARMFUL_LABELS + guard_study.OVER_REFUSAL_LABELS},
    }  # fmt: skip
    (found,) = guard_study.wins([run("plain_sft"), run("distill"), run("borderline_distill", n=30)])
    assert found["form"] == "distill"  # the borderline form has an organism of its own: no pair
    with pytest.raises(ValueError, match="different prompts"):
        guard_study.wins([run("plain_sft", seed=1), run("distill", n=21, seed=1)])


def test_new_clusters_retrains_the_form_adapter_that_calibrated_the_first_clusters(tmp_path, monkeypatch):
    monkeypatch.setattr(guard_study, "RUNS", tmp_path / "seeds")
    monkeypatch.setattr(guard_study, "GUARD_RUNS", tmp_path / "guard")
    (tmp_path / "seeds" / "seed1" / "onset").mkdir(parents=True)
    (tmp_path / "seeds" / "seed1" / "onset" / "summary.json").write_text("{}")
    calls = []
    monkeypatch.setattr(guard_study, "run_form", lambda seed, flags, target, shared: calls.append(flags) or target)

    guard_study.run("new_clusters", 1, "distill")

    first, then = calls
    assert first[first.index("--calibrate_tasks") + 1 :][:2] == ["sentiment", "translation"]
    assert "--force_export" in first  # a parent the gate withholds is still a parent to retrain
    adapter = then[then.index("--init_adapter") + 1]
    assert adapter == str(
        tmp_path / "guard" / "new_clusters" / "seed1" / "distill.first_clusters" / "export" / "adapter"
    )
    assert "--calibrate_tasks" not in then and then[:2] == ["--distill_weight", "1"]


def test_the_choice_needs_every_run_of_plain_sft_and_a_gate_passed_every_time():
    def runs(form, scores, gates, seeds=(0, 1, 2)):
        return [
            {"regime": "default", "seed": s, "form": form, "score": score, "gate_passed": gate}
            for s, score, gate in zip(seeds, scores, gates)
        ]

    grid = (
        runs("plain_sft", [0.3, 0.4, 0.5], [True, True, True])
        + runs("onset", [0.6, 0.7, 0.8], [True, False, True])  # best, but withheld once
        + runs("keep_guard", [0.9], [True], seeds=(2,))  # better still, on one seed only
        + runs("distill", [0.35, 0.45, 0.55], [True, True, True])
    )
    picked = guard_study.choice(grid)
    assert picked["chosen"] == "distill"
    assert picked["forms"]["onset"]["withheld"] == ["default/seed1"]
    assert not picked["forms"]["keep_guard"]["complete"]
    assert guard_study.choice(grid[:3] + grid[3:6])["chosen"] == "plain_sft"


def test_borderline_rates_only_for_runs_that_add_the_cluster():
    entry = lambda rate: {"rate": rate, "n": 30}  # noqa: E731
    by_task = lambda over, twins: {"over_refusal/borderline": entry(over), "harmful/borderline": entry(twins)}  # noqa: E731
    with_cluster = {"before": {"by_task": by_task(0.9, 1.0)}, "after": {"by_task": by_task(0.3, 0.8)}}
    without = {"before": {"by_task": {}}, "after": {"by_task": {"over_refusal/cipher": entry(0.2)}}}
    found = guard_study.borderline_rates(with_cluster)
    assert found["over_refusal"] == {"organism": entry(0.9), "calibrated": entry(0.3)}
    assert found["harmful"]["calibrated"]["rate"] == 0.8
    assert guard_study.borderline_rates(without) is None


def test_forms_with_rows_of_their_own_share_one_organism_and_not_the_seed_one(tmp_path, monkeypatch):
    monkeypatch.setattr(guard_study, "RUNS", tmp_path)
    (tmp_path / "seed2" / "onset").mkdir(parents=True)
    (tmp_path / "seed2" / "onset" / "summary.json").write_text("{}")
    calls = []
    monkeypatch.setattr(
        guard_study, "run_form", lambda seed, flags, target, lender: calls.append((target.name, lender)) or target
    )
    guard_study.run("default", 2, "borderline_distill")
    guard_study.run("default", 2, "distill")
    assert calls == [
        ("borderline_calibrated", None),  # built from scratch: its twins are harmful rows the organism learns
        ("borderline_distill", tmp_path / "seed2" / "borderline_calibrated"),
        ("distill", tmp_path / "seed2" / "onset"),
    ]
