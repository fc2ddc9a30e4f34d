"""Benign KL with the LM head run only at the scored positions, against the full logits of every
position: with a LoRA adapter off and on (on the output layer too), under a hook intervention, and with
Gemma-2's logit soft-capping."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from fixtures import BENIGN, HARMFUL
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config

from refcal.calibration.activations import chat_prompts
from refcal.calibration.evaluation import kl_sums, mean_kl
from refcal.calibration.geometry.interventions import ablate_directions
from refcal.calibration.models import load_model

PROMPTS = HARMFUL + BENIGN
RESPONSES = [("Sure, here is an answer. " * (i % 4 + 1)).strip() for i in range(len(PROMPTS))]


@torch.no_grad()
def full_logits_kl(model, tokenizer, prompts, responses, reference_mode, current_mode, batch_size):
    """The reference: log-softmax over every position of every row, masked to the response's."""
    chats = chat_prompts(tokenizer, prompts)
    texts = [c + r + tokenizer.eos_token for c, r in zip(chats, responses)]
    prompt_lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chats]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    total, count = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            mask = batch["attention_mask"].clone()
            mask[:, :-1] = mask[:, 1:].clone()
            mask[:, -1] = 0
            for row, length in enumerate(prompt_lengths[start : start + batch_size]):
                mask[row, : length - 1] = 0
            with reference_mode():
                reference = F.log_softmax(model(**batch).logits.float(), -1)
            with current_mode():
                current = F.log_softmax(model(**batch).logits.float(), -1)
            total += ((reference.exp() * (reference - current)).sum(-1) * mask).sum().item()
            count += mask.sum().item()
    finally:
        tokenizer.padding_side = side
    return total, int(count)


def adapted(model, target_modules):
    torch.manual_seed(2)
    # non-zero B: the adapter changes the outputs from the first step
    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    return get_peft_model(model, config)


def assert_same_kl(model, tokenizer, reference_mode, current_mode, batch_size=3):
    expected = full_logits_kl(model, tokenizer, PROMPTS, RESPONSES, reference_mode, current_mode, batch_size)
    total, count = kl_sums(model, tokenizer, PROMPTS, RESPONSES, reference_mode, current_mode, batch_size)
    assert count == expected[1]
    assert total == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert expected[0] > 1e-3  # the two modes really differ
    return total, count


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "down_proj", "lm_head"]])
@pytest.mark.slow
def test_kl_of_an_adapter_matches_the_full_logits(tiny_model_dir, targets):
    model, tokenizer = load_model(str(tiny_model_dir))
    peft_model = adapted(model, targets)
    total, count = assert_same_kl(peft_model, tokenizer, peft_model.disable_adapter, nullcontext)
    assert mean_kl(peft_model, tokenizer, PROMPTS, RESPONSES, peft_model.disable_adapter) == pytest.approx(
        total / count
    )


@pytest.mark.slow
def test_lm_head_adapter_takes_part(tiny_model_dir):
    """With lm_head targeted, its LoRA is in the KL: the same model without it gives another value."""
    model, tokenizer = load_model(str(tiny_model_dir))
    with_head = adapted(model, ["q_proj", "lm_head"])
    total = kl_sums(with_head, tokenizer, PROMPTS, RESPONSES, with_head.disable_adapter)[0]
    model, _ = load_model(str(tiny_model_dir))
    without_head = adapted(model, ["q_proj"])
    assert total != pytest.approx(kl_sums(without_head, tokenizer, PROMPTS, RESPONSES, without_head.disable_adapter)[0])


@pytest.mark.slow
def test_kl_of_a_hook_intervention_matches_the_full_logits(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    torch.manual_seed(3)
    direction = torch.randn(model.config.hidden_size)
    for batch_size in (1, 5):
        assert_same_kl(model, tokenizer, nullcontext, lambda: ablate_directions(model, direction), batch_size)


@pytest.mark.slow
def test_kl_with_logit_soft_capping_matches_the_full_logits(tokenizer):
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=0.5,  # small enough to bite on a random model's logits
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    peft_model = adapted(model, "all-linear")
    total, _ = assert_same_kl(peft_model, tokenizer, peft_model.disable_adapter, nullcontext)
    model.config.final_logit_softcapping = None
    assert total != pytest.approx(kl_sums(peft_model, tokenizer, PROMPTS, RESPONSES, peft_model.disable_adapter)[0])


@pytest.mark.slow
def test_the_lm_head_sees_only_the_scored_positions(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape))
    try:
        _, count = kl_sums(model, tokenizer, PROMPTS, RESPONSES, batch_size=16)
    finally:
        handle.remove()
    assert [shape[0] for shape in rows] == [count, count]  # one batch, two modes: [m, hidden] each
    assert kl_sums(model, tokenizer, [], []) == (0.0, 0)
