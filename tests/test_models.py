"""calibration.models: chat-template requirement and weight fingerprints."""

from __future__ import annotations

import shutil

import pytest
import torch

from refcal.calibration.models import decoder_layers, fingerprint, load_model
from refcal.train.testing_utils import save_tiny_model


def test_tokenizer_without_chat_template_is_refused(tiny_model_dir, tokenizer, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    from transformers import AutoTokenizer

    stripped = AutoTokenizer.from_pretrained(plain)
    stripped.chat_template = None
    stripped.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(plain).chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        load_model(str(plain))


def test_tiny_model_loads_with_its_template(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert len(decoder_layers(model)) == 4
    assert not model.training


def test_fingerprint_tells_models_apart_and_ignores_dtype(tiny_model_dir, tokenizer, tmp_path):
    model, _ = load_model(str(tiny_model_dir))
    other_dir = save_tiny_model(tokenizer, tmp_path / "other", seed=1)
    other, _ = load_model(str(other_dir))
    assert fingerprint(model) != fingerprint(other)
    same, _ = load_model(str(tiny_model_dir))
    assert fingerprint(model) == fingerprint(same)
    half, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert fingerprint(model) == fingerprint(half)
    # a single changed weight changes the fingerprint
    with torch.no_grad():
        same.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(same) != fingerprint(model)


def test_auto_dtype_is_bf16_only_where_the_device_computes_in_it(tiny_model_dir, monkeypatch):
    from refcal.calibration import models

    monkeypatch.setattr(models, "native_bf16", lambda cpu: False)
    assert models.load_model(str(tiny_model_dir), "auto")[0].dtype == torch.float32
    monkeypatch.setattr(models, "native_bf16", lambda cpu: True)
    assert models.load_model(str(tiny_model_dir), "auto")[0].dtype == torch.bfloat16
