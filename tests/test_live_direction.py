"""The live direction: r re-estimated from the model being trained, and the keep term moved onto it."""

from __future__ import annotations

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows

from refcal.calibration.activations import capture_last_token
from refcal.calibration.models import load_model
from refcal.train.losses.live_direction import LiveDirection, difference_in_means

LAYERS = [1, 3]


def test_difference_in_means_is_unit_and_projects_the_benign_mean():
    harmful, benign = torch.randn(5, 2, 8) + 3.0, torch.randn(7, 2, 8)
    directions, benign_projection = difference_in_means(harmful, benign)
    assert torch.allclose(directions.norm(dim=-1), torch.ones(2))
    assert torch.allclose(benign_projection, torch.einsum("ld,ld->l", benign.mean(0), directions))


@pytest.mark.slow
def test_training_follows_the_direction_of_the_model_being_trained(tiny_model_dir, tmp_path):
    """Refreshed every 2 steps over 4, the keep term ends on the final model's own difference in means,
    not on the frozen r it started with; the step of the last refresh is the last step."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    frozen = regularizer.directions.clone()
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", max_steps=4, learning_rate=1e-2)
    live = LiveDirection(trainer.regularizer, tokenizer, rows, every=2)
    trainer.add_callback(live)
    trainer.train()
    assert live.refreshed_at == 4
    trainer.model.eval()
    capture = lambda kind: capture_last_token(  # noqa: E731
        trainer.model, tokenizer, [r["prompt"] for r in rows if r["kind"] == kind], LAYERS, progress=False
    )
    directions, _ = difference_in_means(capture("harmful"), capture("benign"))
    assert torch.allclose(trainer.regularizer.directions.cpu(), directions, atol=1e-4)
    assert not torch.allclose(trainer.regularizer.directions.cpu(), frozen.cpu(), atol=1e-3)


def test_a_live_direction_needs_last_token_positions_and_both_kinds(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    with pytest.raises(ValueError, match="harmful and benign"):
        LiveDirection(regularizer, tokenizer, [r for r in rows if r["kind"] != "benign"], every=2)
    regularizer.positions = 3
    with pytest.raises(ValueError, match="regularizer_positions last"):
        LiveDirection(regularizer, tokenizer, rows, every=2)
