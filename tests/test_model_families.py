"""Every supported family, as a tiny randomly initialised model of the same architecture with a chat
template: activation capture, geometry, causal layer choice and two regularized LoRA training steps."""

from __future__ import annotations

import pytest
import torch
from fixtures import BENIGN, HARMFUL, OVER_REFUSAL, build_regularizer, make_trainer, sft_rows
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

from refcal.calibration.activations import capture_last_token
from refcal.calibration.geometry.directions import estimate
from refcal.calibration.geometry.layer_choice import choose_layer
from refcal.calibration.models import decoder_layers, load_model

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **SIZES),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **SIZES),
    "gemma2": lambda v: Gemma2Config(vocab_size=v, head_dim=16, **SIZES),
    "mistral": lambda v: MistralConfig(vocab_size=v, **SIZES),
}


@pytest.fixture(params=sorted(FAMILIES))
def family_dir(request, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[request.param](len(tokenizer)))
    model.save_pretrained(tmp_path / request.param, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / request.param)  # carries the chat template
    return tmp_path / request.param


@pytest.mark.slow
def test_geometry_and_training_on_each_family(family_dir, tmp_path):
    model, tokenizer = load_model(str(family_dir))
    assert len(decoder_layers(model)) == 4
    prompts = HARMFUL + BENIGN + [p for _, p in OVER_REFUSAL] * 2
    kinds = ["harmful"] * 4 + ["benign"] * 4 + ["over_refusal"] * 8
    tasks = ["none"] * 8 + [t for t, _ in OVER_REFUSAL] * 2
    activations = capture_last_token(model, tokenizer, prompts, progress=False)
    assert activations.shape == (16, 4, 64) and torch.isfinite(activations).all()
    geometry = estimate(activations, kinds, tasks, [k != "benign" for k in kinds], "fp", max_rank=2)
    assert set(geometry.subspaces) == {"sentiment", "translation"}
    refusal = tokenizer.encode("I", add_special_tokens=False)[:1]
    layer, table = choose_layer(model, tokenizer, geometry, HARMFUL, BENIGN, refusal, [1, 2], kl_max=1e9, batch_size=8)
    assert layer in (1, 2) and len(table) == 2

    rows = sft_rows()
    trainer = make_trainer(model, tokenizer, rows, build_regularizer(model, tokenizer, rows, [layer]), tmp_path / "out")
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert {"loss/keep", "loss/collapse"} <= {k for e in trainer.state.log_history for k in e}
    targeted = {n.split(".")[-4] for n, _ in trainer.model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "v_proj", "down_proj"} <= targeted  # all-linear reaches attention and MLP
