"""The CPU training step projects only labelled positions in TRL's fused LM head: the same loss and gradients."""

from __future__ import annotations

import importlib

import torch
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM

import refcal.train.speed as speed


def fused_loss_and_grads(model_dir, projected: list[int]):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    labels = ids.clone()
    labels[0, :15] = -100  # a prompt: no labels
    labels[0, 18:20] = -100  # a target-free row's tokens
    real_apply = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        projected.append(hidden.shape[0])
        return real_apply(hidden, *args)

    trl_utils._ChunkedLogProbFunction.apply = counting
    try:
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    finally:
        trl_utils._ChunkedLogProbFunction.apply = real_apply
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_cpu_step_projects_only_labelled_positions_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(trl_utils, "_use_triton", importlib.import_module("trl.kernels.chunked_logprob")._use_triton)
    every: list[int] = []
    loss, grads = fused_loss_and_grads(tiny_model_dir, every)
    speed.score_labelled_positions_only()
    speed.score_labelled_positions_only()  # a second call changes nothing
    labelled: list[int] = []
    compact_loss, compact_grads = fused_loss_and_grads(tiny_model_dir, labelled)
    assert every == [23] and labelled == [23 - 14 - 2]  # next-token labels: 23 positions, 16 without one
    assert torch.equal(loss, compact_loss)
    # the products of the labelled rows are the same up to the matmul's blocking, which can follow the row count
    assert len(grads) == len(compact_grads) == 38
    assert max(((a - b).norm() / a.norm()).item() for a, b in zip(grads, compact_grads)) < 1e-5
