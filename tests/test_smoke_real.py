"""The embedded SmolLM2-135M-Instruct end to end: regularized LoRA steps (onset term included), greedy generation, judging."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import EMBEDDED
from fixtures import build_regularizer, make_trainer, sft_rows

from refcal.calibration.generation import generate
from refcal.calibration.judges.phrases import COMPLY, REFUSE, PhraseJudge
from refcal.calibration.models import decoder_layers, load_model
from refcal.train.losses.onset import build_onset

pytestmark = pytest.mark.e2e  # loads the real embedded SmolLM2-135M and trains it


def test_real_model_trains_generates_and_is_judged(tmp_path):
    model, tokenizer = load_model(EMBEDDED)
    layer = len(decoder_layers(model)) // 2
    rows = sft_rows()[:8]
    assert {r["kind"] for r in rows} == {"harmful", "benign", "over_refusal"}
    regularizer = build_regularizer(model, tokenizer, rows, [layer])
    trainer = make_trainer(
        model,
        tokenizer,
        rows,
        regularizer,
        tmp_path / "out",
        lora_r=8,
        learning_rate=5e-4,
        max_length=256,
        train_sampling_strategy="sequential",  # batches [h b o h] and [b o h b]: every term in both
    )
    # the onset term too (the recommended target-free form trains on it): the real template and LM head
    trainer.onset = build_onset(tokenizer, rows, {"sentiment", "translation"}).to(trainer.accelerator.device)
    trainer.weights = dataclasses.replace(trainer.weights, onset=1.0)
    assert [tokenizer.decode([t]) for t in trainer.onset.onset_tokens.tolist()] == ["I"]  # "I'm sorry, ..."
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
        assert all(math.isfinite(v) for k, v in entry.items() if k.startswith("loss/"))
        assert {"loss/keep", "loss/collapse", "loss/retain", "loss/onset"} <= set(entry) and entry["loss/onset"] > 0
    # before the first update the trainer reads the same hidden states the capture did
    assert steps[0]["loss/keep"] < 1e-4 and abs(steps[0]["loss/collapse"] - 1) < 1e-3 and steps[0]["loss/retain"] < 1e-3

    trained = trainer.model.eval()
    prompts = [r["prompt"] for r in rows]
    responses = generate(trained, tokenizer, prompts, max_new_tokens=16, batch_size=8, progress=False)
    assert len(responses) == 8
    assert all(isinstance(r, str) and r.strip() for r in responses)
    labels = PhraseJudge().label(prompts, responses)
    assert len(labels) == 8 and set(labels) <= {REFUSE, COMPLY}
