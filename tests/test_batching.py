"""Capture and generation back off on out-of-memory instead of failing: same results, smaller batches."""

from __future__ import annotations

import pytest
import torch

from refcal.calibration.activations import capture_last_token
from refcal.calibration.generation import generate
from refcal.calibration.infra.batching import shrinking_batches
from refcal.calibration.models import load_model

PROMPTS = [f"Question number {i}: what is {i} plus {i}?" for i in range(7)]


def test_batches_halve_on_out_of_memory_and_cover_every_item():
    sizes = []

    def run(start, stop):
        if stop - start > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        sizes.append(stop - start)
        return list(range(start, stop))

    out = [item for _, _, chunk in shrinking_batches(7, 8, run, progress=False) for item in chunk]
    assert out == list(range(7)) and max(sizes) == 2


def test_other_errors_and_a_single_item_that_does_not_fit_are_raised():
    def broken(start, stop):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(shrinking_batches(3, 2, broken, progress=False))

    def never_fits(start, stop):
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="item 0 does not fit in memory even alone"):
        list(shrinking_batches(3, 4, never_fits, desc="capture", progress=False))


def oom_above(model, method: str, limit: int, monkeypatch):
    """Make model.<method> fail like a full GPU on batches larger than `limit`."""
    original = getattr(model, method)

    def limited(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return original(*args, **kwargs)

    monkeypatch.setattr(model, method, limited)


@pytest.mark.slow
def test_generation_and_capture_give_the_same_results_after_backing_off(tiny_model_dir, monkeypatch):
    model, tokenizer = load_model(str(tiny_model_dir))
    model.eval()
    expected_answers = generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=8, progress=False)
    expected_states = capture_last_token(model, tokenizer, PROMPTS, layers=[1, 3], batch_size=8, progress=False)
    oom_above(model, "generate", 2, monkeypatch)
    oom_above(model.model, "forward", 3, monkeypatch)  # capture runs the backbone
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=8, progress=False) == expected_answers
    states = capture_last_token(model, tokenizer, PROMPTS, layers=[1, 3], batch_size=8, progress=False)
    torch.testing.assert_close(states, expected_states, rtol=1e-4, atol=1e-5)
