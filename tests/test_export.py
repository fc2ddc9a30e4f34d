"""An exported adapter folder loads with PeftModel.from_pretrained unchanged, and `--merge` writes a plain
model folder whose outputs are the adapted model's."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows
from peft import PeftModel

from refcal.calibration.models import load_model
from refcal.train import cli
from refcal.train.stages.export import merge_adapter


@pytest.fixture
def exported(tiny_model_dir, tmp_path):
    """An adapter trained two steps, in a folder laid out the way the export stage writes it."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    trainer = make_trainer(
        model, tokenizer, rows, build_regularizer(model, tokenizer, rows, [1]), tmp_path / "out", learning_rate=5e-2
    )
    trainer.train()
    folder = tmp_path / "export" / "adapter"
    trainer.model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "calibration_card.json").write_text(json.dumps({"calibrate_tasks": ["sentiment"]}))
    (folder / "README.md").write_text("# card\n")
    batch = tokenizer(["Translate into French: hello"], return_tensors="pt")
    with torch.no_grad():
        expected = trainer.model.eval()(**batch).logits
    return folder, batch, expected


@pytest.mark.slow
def test_exported_adapter_loads_with_peft_unchanged(tiny_model_dir, exported):
    folder, batch, expected = exported
    base, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        untouched = base(**batch).logits
    loaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(untouched, expected, atol=1e-4)  # the adapter changes something


@pytest.mark.slow
def test_merged_folder_is_a_plain_model_with_the_adapters_outputs(tiny_model_dir, exported, tmp_path):
    folder, batch, expected = exported
    base, tokenizer = load_model(str(tiny_model_dir))
    merge_adapter(base, tokenizer, folder, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert list((tmp_path / "merged").glob("*.safetensors")) and not list((tmp_path / "merged").glob("*.bin"))
    merged, _ = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_flag_belongs_to_export():
    with pytest.raises(SystemExit, match="--merge goes with the export"):
        cli.main(["geometry", "--config", "x.yaml", "--merge"])


@pytest.mark.slow
def test_chat_answers_with_and_without_the_adapter(tiny_model_dir, exported):
    import io

    from rich.console import Console

    from refcal.train.chat import chat

    folder, _, _ = exported
    base, tokenizer = load_model(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, folder).eval()
    lines = iter(["Translate into French: hello", "/compare", "Translate into French: hello", "/quit", "never read"])
    out = io.StringIO()
    chat(model, tokenizer, False, 4, lambda: next(lines), Console(file=out, width=120))
    text = out.getvalue()
    assert text.count("calibrated") == 2 and "without the adapter" in text and "on" in text
    assert next(lines) == "never read"  # /quit ended the loop


def test_chat_needs_an_exported_folder(tmp_path):
    from refcal.train.chat import load_calibrated

    with pytest.raises(SystemExit, match="no calibration_card.json"):
        load_calibrated(tmp_path)


@pytest.mark.slow
def test_chat_refuses_an_adapter_made_for_other_weights(tiny_model_dir, exported, tokenizer, tmp_path):
    from fixtures import save_tiny_model

    from refcal.calibration.geometry.directions import FingerprintMismatch
    from refcal.calibration.models import fingerprint
    from refcal.train.chat import load_calibrated

    folder, _, _ = exported
    card = {"calibrate_tasks": ["sentiment"], "calibrated_model": str(tiny_model_dir)}
    card["calibrated_model_fingerprint"] = fingerprint(load_model(str(tiny_model_dir))[0])
    (folder / "calibration_card.json").write_text(json.dumps(card))
    assert load_calibrated(folder)[0].peft_config  # the model it was made on: loads
    other = save_tiny_model(tokenizer, tmp_path / "retrained-base", seed=1)  # same path, other weights
    (folder / "calibration_card.json").write_text(json.dumps({**card, "calibrated_model": str(other)}))
    with pytest.raises(FingerprintMismatch) as error:
        load_calibrated(folder)
    assert card["calibrated_model_fingerprint"] in str(error.value) and fingerprint(load_model(str(other))[0]) in str(
        error.value
    )
