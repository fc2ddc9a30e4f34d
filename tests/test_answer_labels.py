"""bench/answer_labels.py: the hand-labelled answers and what is scored on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.answer_labels import (
    CLASSES,
    FIELDS,
    LABEL_FIELDS,
    LABELS,
    MODELS,
    RECIPE_KINDS,
    class_agreement,
    fit_report,
    judge_agreement,
    read_jsonl,
    read_labels,
    score_classes,
    shared_prompts,
    side,
)

AGREEMENT = Path(__file__).resolve().parent.parent / "bench" / "results" / "answer_labels_agreement.json"


@pytest.fixture(scope="module")
def rows():
    return read_labels(LABELS)


def test_no_prompt_or_content_is_stored_in_the_file():
    stored = read_jsonl(LABELS)
    assert all("prompt" not in r and "content" not in r and "{content}" in r["prompt_template"] for r in stored)


def test_rows_are_self_contained_and_valid(rows):
    assert len(rows) >= 200 and {r["model"] for r in rows} == set(MODELS)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({(r["prompt"], r["answer"]) for r in rows}) == len(rows)
    for row in rows:
        assert tuple(row) == FIELDS, row["id"]
        assert all(isinstance(row[k], str) and row[k] for k in FIELDS if k not in ("refused", "answer")), row["id"]
        assert isinstance(row["answer"], str) and type(row["refused"]) is bool, row["id"]
        assert row["set"] == ("recipe" if row["kind"] in RECIPE_KINDS else row["kind"]), row["id"]
        assert row["answer_class"] in CLASSES[side(row)], row["id"]
        assert row["answer_class"] != "refused" or row["refused"], row["id"]


def test_the_score_half_shares_no_prompt_with_the_fit_half(rows):
    assert {r["half"] for r in rows} == {"fit", "score"}
    assert not shared_prompts(rows)
    assert len(rows) >= 300 and sum(r["half"] == "score" for r in rows) >= 100


def test_a_shared_prompt_stops_the_scoring(rows):
    fit = next(r for r in rows if r["half"] == "fit")
    with pytest.raises(SystemExit, match="1 prompts are in both halves"):
        class_agreement([*rows, {**fit, "id": "copy", "half": "score"}], judge=None)


@pytest.mark.slow
def test_refusal_judge_agreement_recomputes_to_the_committed_figure(rows):
    from refcal.calibration.judges.learned import LearnedJudge
    from refcal.data_recipes.sources import default_data_root

    committed = json.loads(AGREEMENT.read_text(encoding="utf-8"))
    judge = LearnedJudge.from_xstest(default_data_root())
    assert committed["judge"] == judge.version
    assert judge_agreement(rows, judge) == committed["refusal_judge"]
    # refcal's answer classes, scored once on the score half: the figure docs/judge.md quotes
    assert class_agreement(rows, judge) == committed["answer_classes_score_half"]
    assert committed["refusal_judge"]["agreement"]["all"]["n"] == len(rows)


def test_score_classes_scores_the_score_half_without_showing_the_labels(rows):
    truth = {r["id"]: r["answer_class"] for r in rows}

    def classify(row):
        assert not set(LABEL_FIELDS) & set(row)
        return truth[row["id"]]

    result = score_classes(rows, classify)
    figure = result["agreement"]["all"]
    assert figure["rate"] == 1.0 and figure["n"] == sum(r["half"] == "score" for r in rows)
    assert set(result["agreement"]) == {"all", *MODELS}
    assert score_classes(rows, lambda row: "refused")["agreement"]["all"]["rate"] < 1.0


def test_fit_report_scores_the_fit_half_and_lists_each_disagreement(rows, tmp_path):
    from refcal.calibration.judges.phrases import COMPLY

    class Complies:  # a stand-in refusal judge: nothing is refused
        def label(self, prompts, answers):
            return [COMPLY] * len(answers)

    before = AGREEMENT.read_bytes()
    misses = tmp_path / "misses.jsonl"
    report = fit_report(rows, Complies(), misses)
    fit = [r for r in rows if r["half"] == "fit"]
    assert report["agreement"]["all"]["n"] == len(fit)
    listed = read_jsonl(misses)
    assert len(listed) == sum(
        n for pair, n in report["confusion (hand -> classifier)"].items() if len(set(pair.split(" -> "))) == 2
    )
    assert all(r["hand"] != r["classifier"] and {"prompt", "content", "answer"} <= set(r) for r in listed)
    assert any(r["hand"] == "refused" for r in listed)  # nothing refused by the stand-in judge
    assert report["carried_out_recall"]["n"] == sum(r["answer_class"] == "carried_out" for r in fit)
    assert AGREEMENT.read_bytes() == before
