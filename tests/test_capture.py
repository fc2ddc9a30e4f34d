"""Activation capture: in memory and streamed to a safetensors file, identical; a failed stream leaves nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from refcal.calibration.activations import capture_last_token, stream_last_token
from refcal.calibration.models import load_model

PROMPTS = [f"Question {i}: what is {i} plus {i * 3}?" + " really" * (i % 4) for i in range(11)]


@pytest.mark.slow
def test_streamed_file_matches_in_memory_capture(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    in_memory = capture_last_token(model, tokenizer, PROMPTS, layers=[0, 2, 3], batch_size=4, progress=False)
    path = stream_last_token(
        model, tokenizer, PROMPTS, tmp_path / "acts.safetensors", layers=[0, 2, 3], batch_size=4, progress=False
    )
    assert torch.equal(load_file(path)["last_token"], in_memory)
    with safe_open(path, framework="pt") as handle:  # rows can be read lazily
        assert torch.equal(handle.get_slice("last_token")[5:7], in_memory[5:7])
    assert in_memory.shape == (11, 3, model.config.hidden_size)


def test_failed_stream_leaves_no_file(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    calls = []

    def fail_on_third_batch(_module, _args, _output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_hook(fail_on_third_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            stream_last_token(model, tokenizer, PROMPTS, tmp_path / "acts.safetensors", batch_size=4, progress=False)
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []


def test_non_finite_activations_name_the_layer(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    handle = model.model.layers[2].register_forward_hook(
        lambda _m, _a, out: (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    )
    try:
        with pytest.raises(FloatingPointError, match=r"layer\(s\) \[2, 3\]"):
            capture_last_token(model, tokenizer, PROMPTS[:2], progress=False)
    finally:
        handle.remove()


@pytest.mark.slow
def test_generation_reads_the_capture_off_its_prefill(tiny_model_dir):
    """generate_with_activations: the same answers as generate, and each prompt's own last-token states
    (as capture_last_token takes them, in the prompts' order, though generation batches them by length)."""
    from refcal.calibration.generation import generate, generate_with_activations

    model, tokenizer = load_model(str(tiny_model_dir))
    answers, states = generate_with_activations(model, tokenizer, PROMPTS, 6, batch_size=4, progress=False)
    assert answers == generate(model, tokenizer, PROMPTS, 6, batch_size=4, progress=False)
    captured = capture_last_token(model, tokenizer, PROMPTS, batch_size=len(PROMPTS), progress=False)
    assert states.shape == captured.shape
    assert torch.allclose(states, captured, atol=1e-4)
    assert not torch.allclose(states[0], states[1], atol=1e-3)  # rows not mixed up: prompts differ
