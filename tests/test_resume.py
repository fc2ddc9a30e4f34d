"""A training run killed after a checkpoint resumes from it and ends with the uninterrupted run's adapter."""

from __future__ import annotations

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows
from transformers import TrainerCallback

from refcal.calibration.models import load_model
from refcal.train.resume import last_checkpoint

LAYERS = [1, 3]


class Killed(Exception):
    pass


class KillAtStep(TrainerCallback):
    """Stands in for SIGKILL: stops the run dead after `step`, with no save of its own."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def train(tiny_model_dir, output_dir, kill_at: int | None = None, resume: bool = False) -> dict:
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows(repeat=2)
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    torch.manual_seed(0)  # the same LoRA initialisation for every run
    trainer = make_trainer(
        model, tokenizer, rows, regularizer, output_dir, max_steps=5, save_strategy="steps", save_steps=2
    )
    counter = CountSteps()
    trainer.add_callback(counter)
    if kill_at is not None:
        trainer.add_callback(KillAtStep(kill_at))
    trainer.train(resume_from_checkpoint=last_checkpoint(str(output_dir)) if resume else None)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    return {"weights": weights, "losses": losses, "step": trainer.state.global_step, "steps_run": counter.steps}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    whole = train(tiny_model_dir, tmp_path / "whole")
    with pytest.raises(Killed):
        train(tiny_model_dir, tmp_path / "killed", kill_at=3)
    assert last_checkpoint(str(tmp_path / "killed")).endswith("checkpoint-2")
    resumed = train(tiny_model_dir, tmp_path / "killed", resume=True)
    assert resumed["step"] == whole["step"] == 5
    assert (whole["steps_run"], resumed["steps_run"]) == (5, 3)  # it went on from step 2, not from scratch
    # steps 1-2 come back with the checkpoint's log; steps 3-5 are trained again after resuming
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-4)
    assert whole["weights"].keys() == resumed["weights"].keys() and whole["weights"]
    for name, value in whole["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], value, rtol=1e-4, atol=1e-6, msg=name)
