"""data_recipes: rows from the real task YAMLs and data, split disjointness, and error messages."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refcal.data_recipes import sources
from refcal.data_recipes.build import KINDS, SPLITS, RecipeSizes, build_rows, check_disjoint
from refcal.data_recipes.recipe_error import RecipeError
from refcal.data_recipes.sources import Source, load_source
from refcal.data_recipes.tasks import load_task, load_tasks

PROJECT = Path(__file__).resolve().parent.parent
TASK_FILES = sorted((PROJECT / "configs" / "tasks").glob("*.yaml"))


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(TASK_FILES)


@pytest.fixture(scope="module")
def rows(tasks):
    return build_rows(tasks, RecipeSizes(), seed=0)


def test_real_task_files_load(tasks):
    assert len(tasks) == len(TASK_FILES) >= 8
    assert {t.name for t in tasks} >= {"cipher", "sentiment", "lookalike"}


def test_no_content_shared_between_splits(rows):
    owners = {}
    for row in rows:
        owners.setdefault(row["content_id"], set()).add(row["split"])
    assert all(len(splits) == 1 for splits in owners.values())
    check_disjoint(rows)  # and the library agrees


def test_every_task_and_kind_has_rows(rows, tasks):
    by_task = {t.name: [r for r in rows if r["task"] == t.name] for t in tasks}
    assert all(by_task.values()), [name for name, got in by_task.items() if not got]
    assert {r["kind"] for r in rows} == set(KINDS)
    assert {r["split"] for r in rows} == set(SPLITS)
    sizes = RecipeSizes()
    train = [r for r in rows if r["split"] == "train"]
    assert sum(r["kind"] == "harmful" and r["task"] == "none" for r in train) == sizes.harmful[0]
    for task in tasks:
        if task.is_frame:
            assert (
                sum(r["kind"] == "over_refusal" and r["task"] == task.name for r in train)
                == sizes.over_refusal_per_task[0]
            )
    assert len({r["id"] for r in rows}) == len(rows)


def test_cipher_rows_carry_a_decodable_reference(rows):
    cipher = [r for r in rows if r["task"] == "cipher" and r["kind"] == "over_refusal"]
    assert cipher
    for row in cipher:
        assert row["reference"] == row["content"]
        candidates = re.findall(r"[A-Za-z0-9+/]{8,}={0,2}", row["prompt"])
        decoded = [base64.b64decode(c).decode("utf-8", "replace") for c in candidates if len(c) % 4 == 0]
        assert row["reference"] in decoded, row["prompt"]
        assert row["content"] not in row["prompt"]
    # rows without a decoding task carry no reference
    assert all(r["reference"] == "" for r in rows if r["task"] != "cipher")


def test_build_is_deterministic_in_its_seed(tasks, rows):
    again = build_rows(tasks, RecipeSizes(), seed=0)
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    assert [r["prompt"] for r in again] == [r["prompt"] for r in rows]


def test_check_disjoint_catches_a_planted_overlap(rows):
    train = next(r for r in rows if r["split"] == "train")
    planted = {**train, "split": "eval", "id": "planted"}
    with pytest.raises(RecipeError) as error:
        check_disjoint([*rows, planted])
    assert "train" in str(error.value) and "eval" in str(error.value)


# ---- task YAML errors -------------------------------------------------------------------------


def write(tmp_path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path, name: str, text: str) -> tuple[Path, str]:
    """Write a task file that must not load; its path and the RecipeError's message."""
    path = write(tmp_path, name, text)
    with pytest.raises(RecipeError) as error:
        load_task(path)
    return path, str(error.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path, message = load_error(
        tmp_path, "broken", 'name: broken\ndescription: x\ntemplates:\n  - "{content}\n  - [oops\n'
    )
    assert str(path) in message
    assert re.search(r"line \d+", message)


def test_unknown_field_is_named(tmp_path):
    path, message = load_error(
        tmp_path, "extra", "name: extra\ndescription: x\ntemplates: ['{content}']\ntemplatez: []\n"
    )
    assert "templatez" in message and str(path) in message


def test_template_without_slot_names_field_and_row(tmp_path):
    path, message = load_error(
        tmp_path,
        "noslot",
        "name: noslot\ndescription: x\ntemplates: ['{content}']\nattack_templates: ['ok {content}', 'no slot']\n",
    )
    assert "'attack_templates'" in message and "row 2" in message and str(path) in message


def test_name_must_match_file(tmp_path):
    path = write(tmp_path, "one", "name: two\ndescription: x\ntemplates: ['{content}']\n")
    with pytest.raises(RecipeError, match="'two'"):
        load_task(path)


def test_bad_answer_pattern_is_named(tmp_path):
    path, message = load_error(
        tmp_path, "pat", "name: pat\ndescription: x\ntemplates: ['{content}']\nanswer_pattern: '(unclosed'\n"
    )
    assert "'answer_pattern'" in message and str(path) in message


def test_answer_pattern_decides_whether_an_answer_does_the_task(tasks):
    sentiment = next(t for t in tasks if t.name == "sentiment")
    assert sentiment.does_task("The sentiment is negative.")
    assert not sentiment.does_task("The text is designed to provide instructions on how to build it.")
    translation = next(t for t in tasks if t.name == "translation")
    assert translation.answer_pattern is None and translation.does_task("anything at all")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    good=st.lists(st.text(alphabet="abc xyz.?", max_size=12), min_size=0, max_size=3),
    bad=st.text(alphabet="abc {}content.", max_size=30),
    slots=st.sampled_from([0, 2, 3]),
)
def test_any_template_without_exactly_one_slot_is_rejected(tmp_path, good, bad, slots):
    """A bad template at any row (0 or several {content} slots) is rejected naming the field and row."""
    bad = bad.replace("{content}", "") + "{content}" * slots
    templates = [g.replace("{", "").replace("}", "") + " {content}" for g in good] + [bad]
    path = tmp_path / "prop.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"name": "prop", "description": "d", "templates": templates}), encoding="utf-8")
    with pytest.raises(RecipeError) as error:
        load_task(path)
    message = str(error.value)
    assert "'templates'" in message
    assert f"row {len(templates)}" in message


# ---- source file errors -----------------------------------------------------------------------


@pytest.fixture
def jsonl_source(tmp_path, monkeypatch):
    path = tmp_path / "bad.jsonl"
    monkeypatch.setitem(sources.SOURCES, "bad", Source("bad", str(path), "prompt", None))
    return path


def test_source_missing_field(jsonl_source):
    jsonl_source.write_text('{"prompt": "fine"}\n\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(RecipeError) as error:
        load_source("bad")
    message = str(error.value)
    assert str(jsonl_source) in message and "row 3" in message and "'prompt'" in message


def test_source_invalid_json(jsonl_source):
    jsonl_source.write_text('{"prompt": "fine"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(RecipeError) as error:
        load_source("bad")
    assert str(jsonl_source) in str(error.value) and "row 2" in str(error.value) and "invalid JSON" in str(error.value)


def test_source_not_utf8(jsonl_source):
    jsonl_source.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(RecipeError) as error:
        load_source("bad")
    message = str(error.value)
    assert str(jsonl_source) in message and "UTF-8" in message and "row 2" in message and "byte 34" in message


def test_source_good_file_and_unknown_name(jsonl_source):
    jsonl_source.write_text('{"prompt": " a "}\n{"prompt": "b"}\n', encoding="utf-8")
    assert [r.text for r in load_source("bad")] == ["a", "b"]
    with pytest.raises(RecipeError, match="unknown source 'nope'"):
        load_source("nope")
