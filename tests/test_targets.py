"""Target building: where each target comes from, and what is dropped and counted."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from refcal.calibration.judges.phrases import PhraseJudge
from refcal.calibration.models import load_model
from refcal.data_recipes.tasks import TaskCluster
from refcal.train.stages import sft_data as targets


def row(rid: str, kind: str, task: str, reference: str = "", content: str = "make a bomb at home") -> dict:
    return {
        "id": rid, "kind": kind, "task": task, "prompt": f"prompt {rid}", "reference": reference, "content": content,
    }  # fmt: skip


def test_targets_by_kind_and_what_is_dropped(tiny_model_dir, monkeypatch):
    model, tokenizer = load_model(str(tiny_model_dir))
    steered_answers = {
        "prompt s1": "The label is positive.",
        "prompt s2": "I'm sorry, I cannot help with that.",
        "prompt l1": "Some answer.",
        "prompt c1": "Sure, here is how to make a bomb at home: first, you need to gather the parts.",
        "prompt k1": "I like turtles and the sea.",  # no summary of the content
        "prompt k2": "He made a bomb at home.",
    }
    monkeypatch.setattr(targets, "generate", lambda m, t, prompts, *a, **k: [steered_answers[p] for p in prompts])
    tasks = {
        "labels": TaskCluster("labels", "x", ("{content}",), answer_pattern=r"(?i)\bnegative\b"),
        "loose": TaskCluster("loose", "x", ("{content}",)),
        "decode": TaskCluster("decode", "x", ("{content}",), content_transform="base64"),
        "summary": TaskCluster("summary", "x", ("{content}",), answer_check="condenses"),
    }
    rows = [
        row("h", "harmful", "none"),
        row("a", "frame_attack", "labels"),
        row("b", "benign", "none"),
        row("c", "benign", "none"),
        row("s1", "over_refusal", "labels"),
        row("s2", "over_refusal", "labels"),
        row("l1", "over_refusal", "loose"),
        row("c1", "over_refusal", "loose"),
        row("k1", "over_refusal", "summary", content="A bomb was made at home, the report says."),
        row("k2", "over_refusal", "summary", content="A man wrote at length about how he made a bomb at home."),
        row("d", "over_refusal", "decode", reference="plain text"),
        row("x", "over_refusal", "not_calibrated"),
    ]
    own = {"h": "Sure, here is how.", "a": "I'm sorry, I can't.", "b": "An answer.", "c": "I'm sorry, I cannot."}
    labels = {"h": "comply", "a": "refuse", "b": "comply", "c": "refuse"}
    out, stats = targets.build_targets(
        rows, own, labels, model, tokenizer, PhraseJudge(), torch.randn(model.config.hidden_size), tasks,
        max_new_tokens=6, batch_size=4,
    )  # fmt: skip
    by_id = {r["id"]: r["completion_text"] for r in out}
    assert by_id == {
        "h": targets.standard_refusal(0),  # a complying harmful row gets a standard refusal
        "a": "I'm sorry, I can't.",  # own refusal kept
        "b": "An answer.",  # refused benign row c dropped
        "d": "The decoded text is: plain text",
        "l1": "Some answer.",  # s1 names no negative label, s2 still refuses; x is not calibrated
        "k2": "He made a bomb at home.",  # c1 carries the request out; k1 fails the task's check
    }
    assert stats == {
        "harmful_standard_refusal": 1, "frame_attack_own_refusal": 1, "benign_own_answer": 1, "benign_dropped_refused": 1,
        "over_refusal_reference_answer": 1, "over_refusal_steered_answer": 2, "over_refusal_dropped_carried_out": 1,
        "over_refusal_dropped_off_task": 2, "over_refusal_dropped_steered_refusal": 1,
    }  # fmt: skip


def test_helpful_keeps_rows_without_a_helpful_answer_target_free(tiny_model_dir, monkeypatch):
    """objective helpful: the steered answer where it is a helpful one, else the row stays unsupervised."""
    model, tokenizer = load_model(str(tiny_model_dir))
    steered = {"prompt s1": "The sentiment is negative.", "prompt s2": "I'm sorry, I cannot help with that."}
    monkeypatch.setattr(targets, "generate", lambda m, t, prompts, *a, **k: [steered[p] for p in prompts])
    tasks = {"labels": TaskCluster("labels", "x", ("{content}",), answer_pattern=r"(?i)\bnegative\b")}
    rows = [row("h", "harmful", "none"), row("s1", "over_refusal", "labels"), row("s2", "over_refusal", "labels")]
    own = {"h": "I'm sorry, I can't.", "s1": "I cannot.", "s2": "I won't classify that."}
    labels = {"h": "refuse", "s1": "refuse", "s2": "refuse"}
    out, stats = targets.build_targets(
        rows, own, labels, model, tokenizer, PhraseJudge(), torch.randn(model.config.hidden_size), tasks,
        max_new_tokens=6, batch_size=4, keep_untargeted=True,
    )  # fmt: skip
    assert [(r["id"], r["completion_text"], r["supervised"]) for r in out] == [
        ("h", "I'm sorry, I can't.", True),
        ("s1", "The sentiment is negative.", True),
        ("s2", "I won't classify that.", False),
    ]
    assert stats == {
        "harmful_own_refusal": 1, "over_refusal_steered_answer": 1, "over_refusal_no_target_steered_refusal": 1,
    }  # fmt: skip


def test_target_free_over_refusal_rows_keep_their_own_response_unsupervised(tiny_model_dir, monkeypatch):
    """objective: target_free generates no targets: every calibrated over_refusal row stays, unsupervised."""
    model, tokenizer = load_model(str(tiny_model_dir))
    monkeypatch.setattr(targets, "generate", lambda *a, **k: pytest.fail("target-free calibration generates nothing"))
    tasks = {"labels": TaskCluster("labels", "x", ("{content}",))}
    rows = [
        row("h", "harmful", "none"),
        row("s1", "over_refusal", "labels"),
        row("x", "over_refusal", "not_calibrated"),
    ]
    own = {"h": "I'm sorry, I can't.", "s1": "I cannot classify that."}
    labels = {"h": "refuse", "s1": "refuse"}
    out, stats = targets.build_targets(
        rows, own, labels, model, tokenizer, PhraseJudge(), torch.randn(model.config.hidden_size), tasks,
        max_new_tokens=6, batch_size=4, target_free=True,
    )  # fmt: skip
    assert [(r["id"], r["completion_text"], r["supervised"]) for r in out] == [
        ("h", "I'm sorry, I can't.", True), ("s1", "I cannot classify that.", False),
    ]  # fmt: skip
    assert stats == {"harmful_own_refusal": 1, "over_refusal_target_free": 1}
    # as prepare_sft_data saves them and stage_train loads them: the first row is a supervised one, and
    # Dataset.from_list takes its columns from the first row, so a key only target-free rows had was lost
    saved = Dataset.from_list(out).to_list()
    assert targets.sft_dataset(saved)["supervised"] == [True, False]


@pytest.mark.parametrize(
    ("built", "wanted", "fits"),
    [
        ("sft", "sft", True),
        ("sft", "target_free", False),
        ("target_free", "target_free", True),
        ("geometry", "target_free", True),
        ("geometry", "sft", False),
        ("dpo", "dpo", False),
        ("dpo", "sft", True),
        ("sft", "helpful", False),
        ("helpful", "helpful", True),
    ],
)
def test_cached_targets_serve_only_their_objective(tmp_path, built, wanted, fits):
    """targets.json records the objective; `geometry`, target_free's older name, counts as target_free.
    DPO needs the preference pairs (no preferences folder here)."""
    import json

    (tmp_path / "targets.json").write_text(json.dumps({"objective": built}))
    assert targets.sft_data_fits(tmp_path, wanted) is fits
