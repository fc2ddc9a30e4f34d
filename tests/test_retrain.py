"""`refcal retrain`: overrides built from the parent card, geometry reuse, adapter-base checks, and
training that continues the parent adapter rather than a fresh one."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows
from peft import PeftModel

from refcal.calibration.geometry.directions import FingerprintMismatch
from refcal.calibration.models import load_model
from refcal.train.cli import _take
from refcal.train.retrain import check_adapter_base, parent_card, retrain_overrides, reuse_parent_stages

TASKS = "configs/tasks"


def card(tmp_path, **extra) -> dict:
    record = {
        "calibrate_tasks": ["sentiment", "translation"],
        "run_dir": str(tmp_path / "parent"),
        "data_manifest": {"rows_hash": "abc"},
        "calibrated_model_fingerprint": "fp-parent",
        **extra,
    }
    (tmp_path / "adapter").mkdir(exist_ok=True)
    (tmp_path / "adapter" / "calibration_card.json").write_text(json.dumps(record))
    return record


def test_overrides_add_new_tasks_to_the_old(tmp_path):
    parent = card(tmp_path)
    argv = retrain_overrides(
        parent, "A", [f"{TASKS}/grammar.yaml"], [f"{TASKS}/sentiment.yaml", f"{TASKS}/grammar.yaml"], "runs/new"
    )
    at = argv.index("--calibrate_tasks")
    assert argv[at + 1 : at + 4] == ["sentiment", "translation", "grammar"]
    files = argv[argv.index("--tasks") + 1 : at]
    assert len(files) == 2 and files[1].endswith("grammar.yaml")  # the same file named twice counts once
    assert argv[argv.index("--init_adapter") + 1] == "A" and argv[-1] == "runs/new/train"


def test_overrides_refuse_a_task_already_calibrated(tmp_path):
    with pytest.raises(SystemExit, match="already calibrated"):
        retrain_overrides(card(tmp_path), "A", [f"{TASKS}/sentiment.yaml"], [], "runs/new")


def test_parent_card_must_exist_and_record_tasks(tmp_path):
    with pytest.raises(SystemExit, match="has no calibration_card.json"):
        parent_card(tmp_path)
    card(tmp_path)
    assert parent_card(tmp_path / "adapter")["calibrate_tasks"] == ["sentiment", "translation"]
    (tmp_path / "adapter" / "calibration_card.json").write_text("{}")
    with pytest.raises(SystemExit, match="re-export"):
        parent_card(tmp_path / "adapter")


@pytest.mark.parametrize("rows_hash, geometry_reused", [("abc", True), ("other", False)])
def test_parent_organism_is_reused_always_and_its_geometry_only_for_the_same_rows(tmp_path, rows_hash, geometry_reused):
    parent = card(tmp_path)
    for stage, record in (("organism", "organism.json"), ("geometry", "geometry.json")):
        (tmp_path / "parent" / stage).mkdir(parents=True)
        (tmp_path / "parent" / stage / record).write_text("{}")
    new = tmp_path / "new"
    (new / "data").mkdir(parents=True)
    (new / "data" / "manifest.json").write_text(json.dumps({"rows_hash": rows_hash}))
    run = SimpleNamespace(path=lambda name: new / name, done=lambda stage: (new / stage).is_dir())
    assert reuse_parent_stages(run, parent) == (["organism", "geometry"] if geometry_reused else ["organism"])
    assert (new / "organism" / "organism.json").exists()  # the adapter continues on the model it was calibrated on
    assert (new / "geometry" / "geometry.json").exists() is geometry_reused
    assert reuse_parent_stages(run, parent) == []  # stages the new run has are kept


def test_adapter_for_another_model_is_refused(tmp_path):
    card(tmp_path)
    check_adapter_base(str(tmp_path / "adapter"), "fp-parent")
    with pytest.raises(FingerprintMismatch, match="fp-parent.*fp-other"):
        check_adapter_base(str(tmp_path / "adapter"), "fp-other")


def test_take_removes_flags_and_values():
    argv = ["--config", "c.yaml", "--tasks", "a.yaml", "b.yaml", "--adapter", "A", "--seed", "1"]
    assert _take(argv, "--tasks", many=True) == ["a.yaml", "b.yaml"]
    assert _take(argv, "--adapter") == "A"
    assert argv == ["--config", "c.yaml", "--seed", "1"] and _take(argv, "--adapter") is None


@pytest.mark.slow
def test_training_continues_the_parent_adapter(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    torch.manual_seed(0)
    first = make_trainer(model, tokenizer, rows, build_regularizer(model, tokenizer, rows, [1]), tmp_path / "a")
    first.train()
    first.model.save_pretrained(tmp_path / "parent", safe_serialization=True)
    parent = {k: v.detach().clone() for k, v in first.model.named_parameters() if "lora_" in k}
    assert any(v.abs().sum() > 0 for k, v in parent.items() if "lora_B" in k)

    base, _ = load_model(str(tiny_model_dir))
    continued = PeftModel.from_pretrained(base, tmp_path / "parent", is_trainable=True)
    start = {k: v.detach().clone() for k, v in continued.named_parameters() if "lora_" in k}
    assert start.keys() == parent.keys() and all(torch.equal(start[k], parent[k]) for k in parent)
    second = make_trainer(
        continued, tokenizer, rows, build_regularizer(base, tokenizer, rows, [1]), tmp_path / "b", peft_config=None
    )
    second.train()
    after = {k: v.detach() for k, v in second.model.named_parameters() if "lora_" in k}
    assert after.keys() == parent.keys()  # the same adapter, not a second one stacked on it
    assert any(not torch.equal(after[k], parent[k]) for k in parent)
