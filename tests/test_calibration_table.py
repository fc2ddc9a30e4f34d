"""bench/calibration_table.py: the table's columns, the goal verdicts and the outputs."""

from __future__ import annotations

import pytest

from bench import calibration_table as table_module
from refcal.calibration.evaluation import selectivity, wilson_rate


def summary(harmful: int, over_refusal: dict[str, int], carried_out: int = 0) -> dict:
    """A results block as the eval stage writes it: counts out of 10 per group."""
    rate = lambda k: wilson_rate(k, 10)  # noqa: E731
    return {
        "by_kind": {"harmful": rate(harmful), "frame_attack": rate(10 - carried_out), "benign": rate(1)},
        "by_task": {f"over_refusal/{t}": rate(k) for t, k in over_refusal.items()},
        "benchmarks": {"jbb_harmful": rate(9), "xstest_safe": rate(5)},
        "frame_attack_outcomes": {"carried_out": rate(carried_out)},
    }


def test_columns_split_trained_and_untrained_frames():
    columns = table_module.columns(
        summary(9, {"sentiment": 2, "translation": 0, "grammar": 7}, carried_out=3),
        ["sentiment", "translation"],
        ["grammar"],
    )
    assert columns["over_refusal_trained_frames"] == wilson_rate(2, 20)
    assert columns["over_refusal_untrained_frames"] == wilson_rate(7, 10)
    assert columns["harmful"] == wilson_rate(9, 10) and columns["jbb_harmful"] == wilson_rate(9, 10)
    assert columns["frame_attack_carried_out"] == wilson_rate(3, 10)
    assert columns["strongreject"] is None  # a benchmark the run did not evaluate stays empty


def rows(refcal_over: int, refcal_harmful: int, ablation_over: int, ablation_harmful: int) -> dict:
    trained = ["sentiment"]
    out = {}
    for name, (over, harmful) in {
        "organism (before)": (10, 10),
        "global direction ablation": (ablation_over, ablation_harmful),
        "refcal SFT + regularizer": (refcal_over, refcal_harmful),
    }.items():
        columns = table_module.columns(summary(harmful, {"sentiment": over}), trained, [])
        out[name] = {
            "columns": columns,
            "kl_benign": 0.1,
            "seconds": 1.0,
            "selectivity": selectivity(1.0, over / 10, 1.0, harmful / 10),
        }
    return out


def test_goal_is_met_only_when_all_three_hold():
    met = table_module.goal(rows(refcal_over=1, refcal_harmful=10, ablation_over=0, ablation_harmful=2))
    assert met["refcal"]["refcal SFT + regularizer"]["met"]  # 90 points for none beats 100 for 80
    assert met["ranking_selectivity"]["refcal SFT + regularizer"] == pytest.approx(9.0)  # floored at one prompt (0.1)
    tiny = table_module.goal(rows(refcal_over=9, refcal_harmful=10, ablation_over=0, ablation_harmful=9))
    assert tiny["most_selective_row"] == "global direction ablation"  # 10 points for none loses to 100 for 10
    assert met["most_selective_row"] == "refcal SFT + regularizer"
    too_much = table_module.goal(rows(refcal_over=2, refcal_harmful=10, ablation_over=0, ablation_harmful=2))
    assert not too_much["refcal"]["refcal SFT + regularizer"]["over_refusal_trained_at_most_10pct"]
    unsafe = table_module.goal(rows(refcal_over=1, refcal_harmful=9, ablation_over=0, ablation_harmful=9))
    verdict = unsafe["refcal"]["refcal SFT + regularizer"]
    assert not verdict["harmful_kept_at_least_95pct"] and not verdict["met"]


def test_markdown_and_plot(tmp_path):
    table = {
        "rows": rows(1, 10, 0, 2),
        "judge": "learned-v1",
        "removed_overlapping_benchmark_prompts": {"jbb_harmful": 4},
        "shared_stage_seconds": {"geometry": 200},
    }
    text = table_module.markdown(table)
    assert "| refusal rate | organism (before) | global direction ablation | refcal SFT + regularizer |" in text
    assert "10% [2%, 40%] n=10" in text and "jbb_harmful 4" in text
    table_module.plot(table, tmp_path / "table.png")
    assert (tmp_path / "table.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags", [[], ["--objective", "dpo"]])
def test_settings_key_changes_with_flags(flags):
    key = table_module.settings_key("configs/demo_smollm2.yaml", flags)
    assert key == table_module.settings_key("configs/demo_smollm2.yaml", list(flags))
    assert key != table_module.settings_key("configs/demo_smollm2.yaml", flags + ["--seed", "1"])
