"""Causal layer choice: prompts encoded once (harmful and benign in the same batches, the chat template's
prefix run once per pass) give the scores of one plain forward pass per prompt set and candidate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures import BENIGN, HARMFUL
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from refcal.calibration.activations import chat_prompts, encode_left_padded
from refcal.calibration.geometry import layer_choice
from refcal.calibration.geometry.directions import Geometry
from refcal.calibration.geometry.interventions import ablate_directions

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
LONGER = [f"Explain, in {i} short sentences, how rain forms over the sea." + " Thanks!" * i for i in range(1, 5)]
FAMILIES = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **SIZES),
    # logit soft-capping that bites on a random model, and sliding-window layers
    "gemma2": lambda v: Gemma2Config(vocab_size=v, head_dim=16, final_logit_softcapping=0.5, **SIZES),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tokenizer):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[request.param](len(tokenizer))).eval()


@pytest.fixture(scope="module")
def geometry(model):
    torch.manual_seed(1)
    directions = torch.randn(model.config.num_hidden_layers, model.config.hidden_size)
    return Geometry("fp", directions, {}, {}, layer=1)


@torch.no_grad()
def plain_logprobs(model, tokenizer, prompts: list[str], batch_size: int) -> torch.Tensor:
    """The reference: each prompt set on its own, left padded, the whole prompt in every pass: [n, vocab]."""
    texts = chat_prompts(tokenizer, prompts)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode_left_padded(tokenizer, texts[start : start + batch_size], "cpu")
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        out.append(F.log_softmax(logits, dim=-1))
    return torch.cat(out)


def plain_choice(model, tokenizer, geometry, harmful, benign, tokens, candidates, batch_size) -> list[dict]:
    """Every candidate's scores, one plain pass per prompt set and candidate."""
    base_harmful = layer_choice.refusal_score(plain_logprobs(model, tokenizer, harmful, batch_size), tokens)
    base_benign = plain_logprobs(model, tokenizer, benign, batch_size)
    table = []
    for layer in candidates:
        with ablate_directions(model, geometry.direction(layer)):
            scores = layer_choice.refusal_score(plain_logprobs(model, tokenizer, harmful, batch_size), tokens)
            ablated = plain_logprobs(model, tokenizer, benign, batch_size)
        kl = F.kl_div(ablated, base_benign, log_target=True, reduction="batchmean").item()
        drop = (base_harmful - scores).mean().item()
        table.append(
            {"layer": layer, "refusal_score": scores.mean().item(), "refusal_score_drop": drop, "benign_kl": kl}
        )
    return table


def assert_tables_equal(table: list[dict], reference: list[dict]) -> None:
    assert [row["layer"] for row in table] == [row["layer"] for row in reference]
    for row, expected in zip(table, reference):
        assert set(row) == set(expected)
        for key in ("refusal_score", "refusal_score_drop", "benign_kl"):
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (row["layer"], key)


@pytest.mark.slow
def test_choice_matches_plain_passes(model, tokenizer, geometry, batch_size=3):
    harmful, benign = HARMFUL + LONGER[:2], BENIGN + LONGER[2:]
    encoded = layer_choice.encode_prompts(model, tokenizer, harmful + benign, [False] * 6 + [True] * 6, batch_size)
    assert encoded.prefix.shape[1] > 0  # the chat template's header runs once per pass
    tokens = [tokenizer.encode("I", add_special_tokens=False)[0], 42]
    layer, table = layer_choice.choose_layer(
        model, tokenizer, geometry, harmful, benign, tokens, [1, 2, 3], 1e9, batch_size
    )
    reference = plain_choice(model, tokenizer, geometry, harmful, benign, tokens, [1, 2, 3], batch_size)
    assert_tables_equal(table, reference)
    assert layer == min(reference, key=lambda row: row["refusal_score"])["layer"]
    assert max(row["benign_kl"] for row in table) > 1e-4  # the ablation changed the distributions compared


def test_without_a_shared_prefix_the_scores_are_the_same(model, tokenizer, geometry, monkeypatch):
    tokens = [tokenizer.encode("I", add_special_tokens=False)[0]]
    args = (model, tokenizer, geometry, HARMFUL, BENIGN, tokens, [1, 2], 1e9, 3)
    shared = layer_choice.choose_layer(*args)[1]
    monkeypatch.setattr(layer_choice, "prefix_cacheable", lambda _model, _longest: False)
    assert layer_choice.encode_prompts(model, tokenizer, HARMFUL, [False] * 4).prefix.shape[1] == 0
    assert_tables_equal(layer_choice.choose_layer(*args)[1], shared)


def test_per_prompt_scores_do_not_depend_on_the_share_of_prompts(model, tokenizer):
    """A process may score a share of the prompts: the shares gathered give the whole set's scores."""
    prompts, kl = HARMFUL + BENIGN + LONGER, [i % 3 != 0 for i in range(12)]
    tokens = [10, 20, 30]
    whole = layer_choice.first_token_scores(
        model, layer_choice.encode_prompts(model, tokenizer, prompts, kl, 4), tokens
    )
    halves = [
        layer_choice.first_token_scores(
            model, layer_choice.encode_prompts(model, tokenizer, prompts[s], kl[s], 4), tokens
        )
        for s in (slice(0, 5), slice(5, None))
    ]
    for gathered, expected in zip(zip(*halves), whole):
        assert torch.allclose(torch.cat(gathered), expected, atol=1e-5)
    # and the same as the plain log-softmax of each prompt
    reference = plain_logprobs(model, tokenizer, prompts, 12)
    assert torch.allclose(whole[0], torch.logsumexp(reference[:, tokens], -1), atol=1e-5)
    assert torch.allclose(whole[1], reference[torch.tensor(kl)], atol=1e-5)
    _, kl_values = layer_choice.first_token_scores(
        model, layer_choice.encode_prompts(model, tokenizer, prompts, kl, 4), tokens, whole[1]
    )
    assert kl_values.shape == (sum(kl),) and kl_values.abs().max().item() < 1e-5


def test_a_sliding_window_shorter_than_the_prompts_is_not_shared(tokenizer):
    """Padding between the prefix and a prompt would push prefix tokens out of a short window."""
    config = Gemma2Config(vocab_size=len(tokenizer), head_dim=16, sliding_window=8, **SIZES)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = HARMFUL + LONGER
    encoded = layer_choice.encode_prompts(model, tokenizer, prompts, [True] * 8, 3)
    assert encoded.prefix.shape[1] == 0
    _, logprobs = layer_choice.first_token_scores(model, encoded, [10])
    assert torch.allclose(logprobs, plain_logprobs(model, tokenizer, prompts, 3), atol=1e-5)
