"""The borderline seeds: everyday questions that sound harmful, each beside its harmful twin. The pairs are
balanced across harm categories, none is a near copy of an evaluation prompt (or of any other source), and
a recipe keeps each safe question and its twin in one split, cutting val pairs so that a val split leaves
the train and eval rows as they were."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from refcal.calibration.kinds import HARMFUL, OVER_REFUSAL
from refcal.data_recipes.build import RecipeSizes, build_recipe
from refcal.data_recipes.overlap import OverlapIndex, content_id, near_copies
from refcal.data_recipes.sources import SOURCES, load_source, read_records
from refcal.data_recipes.tasks import load_task

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "data_recipes" / "seeds" / "borderline.jsonl"
CATEGORIES = {
    "deception", "privacy", "self_harm", "illegal_activity", "violence",
    "weapons", "drugs", "hacking", "harassment", "sexual_content",
}  # fmt: skip
OWN = ("borderline_safe", "borderline_unsafe")


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return [record for _, record in read_records(SEEDS, "safe")]


def test_pairs_are_balanced_and_well_formed(pairs):
    assert len(pairs) == 120
    assert Counter(p["type"] for p in pairs) == {category: 12 for category in CATEGORIES}
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert all(set(p) == {"id", "type", "safe", "unsafe"} for p in pairs)
    assert all(content_id(p["safe"]) != content_id(p["unsafe"]) for p in pairs)
    assert all(8 <= len(p[side].split()) <= 35 for p in pairs for side in ("safe", "unsafe"))


def test_sources_read_the_pairs_in_order(pairs):
    assert [r.text for r in load_source("borderline_safe")] == [p["safe"] for p in pairs]
    assert [r.meta["id"] for r in load_source("borderline_unsafe")] == [p["id"] for p in pairs]


def test_no_text_is_a_near_copy_of_another_source():
    """Every other named source: the external evaluation sets (XSTest, OKTest, CoCoNot contrast, JBB,
    StrongREJECT, HarmBench), the harmful and benign pools and the lookalike seeds."""
    others = [name for name in SOURCES if name not in OWN]
    assert {"xstest_safe", "oktest", "coconot_contrast", "strongreject", "lookalike_unsafe"} <= set(others)
    index = OverlapIndex([row.text for name in others for row in load_source(name)])
    texts = [row.text for name in OWN for row in load_source(name)]
    assert [text for text in texts if index.overlaps(text)] == []


def test_no_pair_is_a_near_copy_of_another_pair(pairs):
    """Otherwise a recipe could drop one text of a pair as a near copy of a pair in an earlier split."""
    texts = [(p["id"], p[side]) for p in pairs for side in ("safe", "unsafe")]
    assert [(a, b) for i, (a, x) in enumerate(texts) for b, y in texts[i + 1 :] if a != b and near_copies(x, y)] == []


def test_a_recipe_keeps_each_safe_question_and_its_twin_in_one_split(pairs):
    task = load_task(ROOT / "configs" / "clusters" / "borderline.yaml")
    assert (task.over_refusal_source, task.harmful_source, task.templates) == (*OWN, ("{content}",))
    rows, _ = build_recipe([task], RecipeSizes(lookalike=(60, 20, 40)), seed=0)
    split_of = {(r["kind"], r["content"]): r["split"] for r in rows if r["task"] == "borderline"}
    assert len(split_of) == 2 * len(pairs)
    for p in pairs:
        assert split_of[(OVER_REFUSAL, p["safe"])] == split_of[(HARMFUL, p["unsafe"])], p["id"]
    assert Counter(split_of.values()) == {"train": 120, "val": 40, "eval": 80}


def test_growing_the_val_split_leaves_train_and_eval_rows_as_they_were():
    """Val pairs come from the far end of the shuffled pairs: a config that gives its lookalikes val rows
    trains and reports on the same rows as before."""
    task = load_task(ROOT / "configs" / "tasks" / "lookalike.yaml")
    without, _ = build_recipe([task], RecipeSizes(lookalike=(16, 0, 30)), seed=3)
    with_val, _ = build_recipe([task], RecipeSizes(lookalike=(16, 20, 30)), seed=3)

    def pick(rows: list[dict], split: str) -> list[tuple[str, str]]:
        return [(r["kind"], r["prompt"]) for r in rows if r["task"] == "lookalike" and r["split"] == split]

    assert pick(with_val, "train") == pick(without, "train")
    assert pick(with_val, "eval") == pick(without, "eval")
    val = Counter(kind for kind, _ in pick(with_val, "val"))  # less a near copy of an earlier split's content
    assert set(val) == {OVER_REFUSAL, HARMFUL} and 18 <= min(val.values()) and max(val.values()) <= 20
    assert pick(without, "val") == []
