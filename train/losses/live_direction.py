"""A live harmful direction for the keep term: r re-estimated from the model being trained.

A direction frozen before training loses its causal hold within an epoch (docs/regularizer-study.md):
the adapter can lower harmful refusal along directions the frozen r no longer describes. Every
`keep_refresh_steps` optimizer steps this callback measures the model as it is now on the training rows'
harmful and benign prompts (last prompt token, the regularizer's layers), takes the difference in means
as r, and moves the regularizer onto it (GeometryRegularizer.follow). Every process computes the same
refresh from the same rows, so DDP processes stay identical; a resumed run refreshes before its first step.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from refcal.calibration.activations import capture_last_token
from refcal.calibration.geometry.directions import harmful_direction, unit
from refcal.calibration.kinds import BENIGN, HARMFUL
from refcal.calibration.models import evaluating
from refcal.train.losses.regularizer import GeometryRegularizer


def difference_in_means(harmful: torch.Tensor, benign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit r per layer (the geometry stage's harmful_direction) and the benign rows' mean projection on it,
    from [n, Lr, d] activations."""
    directions = unit(harmful_direction(harmful.float(), benign.float()))
    return directions, (benign.float().mean(0) * directions).sum(-1)


class LiveDirection(TrainerCallback):
    def __init__(self, regularizer: GeometryRegularizer, tokenizer, rows: list[dict], every: int):
        if regularizer.positions != 1:
            raise ValueError("keep_direction live needs regularizer_positions last")
        self.regularizer, self.tokenizer, self.every = regularizer, tokenizer, every
        self.harmful = [r["prompt"] for r in rows if r["kind"] == HARMFUL]
        self.benign = [r["prompt"] for r in rows if r["kind"] == BENIGN]
        if not self.harmful or not self.benign:
            raise ValueError("keep_direction live needs harmful and benign training rows")
        self.refreshed_at: int | None = None

    @torch.no_grad()
    def refresh(self, model, step: int) -> None:
        layers = self.regularizer.layers
        capture = lambda prompts: capture_last_token(  # noqa: E731
            model, self.tokenizer, prompts, layers, desc="live direction", progress=False
        )
        with evaluating(model):
            directions, benign_projection = difference_in_means(capture(self.harmful), capture(self.benign))
        device = self.regularizer.directions.device
        self.regularizer.follow(directions.to(device), benign_projection.to(device))
        self.refreshed_at = step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:  # resumed: the direction the killed run had followed is not saved
            self.refresh(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.refresh(model, state.global_step)
