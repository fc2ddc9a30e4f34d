"""calibration.models: chat-template requirement and weight fingerprints."""

from __future__ import annotations

import shutil

import pytest
import torch
from fixtures import save_tiny_model

from refcal.calibration.models import decoder_layers, fingerprint, load_model


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


def test_auto_dtype_is_fp32_on_a_cpu_and_bf16_on_a_gpu_that_computes_in_it(tiny_model_dir, monkeypatch):
    from refcal.calibration import models

    # a CPU with native bf16 kernels still gets fp32: its rounding differs from one CPU kind to another
    monkeypatch.setattr(models, "native_bf16", lambda cpu: True)
    assert models.load_model(str(tiny_model_dir), "auto", device="cpu")[0].dtype == torch.float32
    assert models.auto_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.auto_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.auto_dtype("cuda") == torch.float32


def test_the_device_sentinel_catches_a_model_left_off_the_runs_device(tiny_model_dir):
    """tests/device_sentinel.py, which the whole-pipeline tests run under, tells a model loaded onto the
    process's device from one loaded without a device, on a machine where both land on the CPU."""
    from accelerate import PartialState
    from device_sentinel import device_sentinel

    from refcal.calibration.generation import generate

    with device_sentinel() as strays:
        model, tokenizer = load_model(str(tiny_model_dir), device=PartialState().device)
        generate(model, tokenizer, ["Hi"], 2, progress=False)
    assert strays == []
    with device_sentinel() as strays:
        model, tokenizer = load_model(str(tiny_model_dir))
        generate(model, tokenizer, ["Hi"], 2, progress=False)
    assert strays and strays[0].startswith("LlamaForCausalLM on cpu")


def test_a_gguf_conversion_builds_each_parse_once_and_restores_the_library():
    import gguf

    from refcal.calibration.models import _gguf_parsed_once

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 3) is not gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.get_tensor_name_map(arch, 2) is not gguf.get_tensor_name_map(arch, 2)
