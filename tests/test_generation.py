"""refcal's decoding loop (shared prompt prefix, finished rows leave the batch) against transformers'
`generate`: the same greedy answers, and the fallback where the generation config asks for more."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import refcal.calibration.generation as generation
from refcal.calibration.activations import chat_prompts
from refcal.calibration.models import load_model

PROMPTS = [f"Question {i}: what is {i} plus {i * 3}?" + " really" * (i % 4) for i in range(11)]
# lengths far apart: the prompt pass runs in groups
UNEVEN = [f"Say {i} back." + " Then add another clause that makes this prompt longer." * (i % 3) ** 3 for i in range(9)]


def test_shared_prefix_leaves_every_prompt_a_token():
    assert generation.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert generation.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert generation.shared_prefix_length([[7, 2], [1, 2]]) == 0
    assert generation.shared_prefix_length([]) == 0


def test_prefill_groups_cut_the_padding_where_lengths_are_far_apart():
    assert generation.prefill_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]
    groups = generation.prefill_groups([200, 3, 4, 3, 190], call_cost=64)
    assert groups == [[1, 3, 2], [4, 0]]
    assert generation.prefill_groups([200, 3, 4, 3, 190], call_cost=10_000) == [[1, 3, 2, 4, 0]]
    assert generation.prefill_groups([]) == []


@pytest.mark.slow
def test_a_prompt_pass_in_groups_gives_the_answers_of_generate(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    texts = chat_prompts(tokenizer, UNEVEN)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    decoder = generation._SharedPrefixGreedy(model, tokenizer, ids, "cpu")
    model.generation_config.eos_token_id = tokenizer.vocab_size + 7  # every answer runs its full length
    batch = list(range(len(UNEVEN)))
    groups = generation.prefill_groups([len(r) for r in decoder.rest])
    assert len(groups) > 1
    own, passed = decoder(batch, 10, [False])
    assert passed == [row for group in groups for row in group]
    reference = [generation._hf_generate(model, tokenizer, [t], 10, "cpu", [False])[0] for t in texts]
    assert own == reference


@pytest.mark.slow
def test_decoding_loop_matches_generate_with_rows_ending_at_different_steps(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    texts = chat_prompts(tokenizer, PROMPTS)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert generation.shared_prefix_length(ids) > 0  # the chat template's header is shared
    assert generation.plain_argmax(model)
    batches = [list(range(0, 6)), list(range(6, 11))]

    def both(max_new_tokens):
        decoder = generation._SharedPrefixGreedy(model, tokenizer, ids, "cpu")
        own = [row for batch in batches for row in decoder(batch, max_new_tokens, [False])[0]]
        reference = [
            row
            for batch in batches
            for row in generation._hf_generate(
                model, tokenizer, [texts[i] for i in batch], max_new_tokens, "cpu", [False]
            )
        ]
        return own, reference

    model.generation_config.eos_token_id = tokenizer.vocab_size + 7  # never emitted: every answer runs 12 tokens
    own, reference = both(12)
    assert own == reference
    # a token that ends some rows mid-answer, in each batch, but not every row: rows leave their batch early
    stop = next(
        t
        for t in sorted({t for row in reference for t in row[1:8]})
        if all(0 < sum(t in reference[i][:8] for i in batch) < len(batch) for batch in batches)
    )
    model.generation_config.eos_token_id = stop
    own, reference = both(12)
    ended = [row[: row.index(stop) + 1] if stop in row else row for row in reference]  # generate pads after the end
    assert own == ended
    assert len({len(row) for row in own}) > 1


def test_generation_config_beyond_the_argmax_goes_through_generate(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    layers = model.config.num_hidden_layers
    model.config.layer_types = ["full_attention"] * (layers - 1) + ["sliding_attention"]
    assert generation.plain_argmax(model)
    model.config.layer_types = ["full_attention"] * (layers - 1) + ["mamba"]  # recurrent state: not shared
    assert not generation.plain_argmax(model)
    model.config.layer_types = ["full_attention"] * layers
    model.generation_config.repetition_penalty = 1.3
    assert not generation.plain_argmax(model)
    with mock.patch.object(generation, "_SharedPrefixGreedy", side_effect=AssertionError("own loop used")):
        answers = generation.generate(model, tokenizer, PROMPTS[:3], 5, batch_size=2, progress=False)
    assert len(answers) == 3


@pytest.mark.parametrize("own_loop", [True, False])
@pytest.mark.slow
def test_activations_come_from_the_prompt_pass_only(tiny_model_dir, own_loop):
    from refcal.calibration.activations import capture_last_token

    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = PROMPTS + UNEVEN  # a batch of uneven lengths runs its prompt pass in groups
    with mock.patch.object(generation, "plain_argmax", lambda _model: own_loop):
        _, states = generation.generate_with_activations(model, tokenizer, prompts, 4, batch_size=10, progress=False)
    captured = capture_last_token(model, tokenizer, prompts, batch_size=len(prompts), progress=False)
    assert states.shape == captured.shape
    assert (states - captured).abs().max() < 1e-4


def test_a_sliding_window_shorter_than_a_prompt_goes_through_generate(tiny_model_dir):
    """Shared-prefix decoding pads between the prefix and each prompt: past a sliding window that padding
    would push prefix tokens out of the window, so such prompts take `model.generate`."""
    model, tokenizer = load_model(str(tiny_model_dir))
    model.config.sliding_window = 8  # shorter than any chat prompt
    with mock.patch.object(generation, "_SharedPrefixGreedy", side_effect=AssertionError("own loop used")):
        answers = generation.generate(model, tokenizer, PROMPTS[:2], 3, batch_size=2, progress=False)
    assert len(answers) == 2
    model.config.sliding_window = 4096
    assert generation.prefix_cacheable(model, 200)


def test_decoding_reads_back_once_per_step(tiny_model_dir):
    """Each decoding step copies the tokens and the rows' ends to the host in one transfer, not one per check."""
    model, tokenizer = load_model(str(tiny_model_dir))
    steps = 6
    calls = []
    original = torch.Tensor.tolist

    def counting(tensor):
        calls.append(tuple(tensor.shape))
        return original(tensor)

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chat_prompts(tokenizer, PROMPTS[:2])]
    decoder = generation._SharedPrefixGreedy(model, tokenizer, ids, "cpu")
    decoder.stop = torch.tensor([-1])  # no row ends early: every step is a full one
    with mock.patch.object(torch.Tensor, "tolist", counting):
        answers, _ = decoder([0, 1], steps, [False])
    assert [len(a) for a in answers] == [steps, steps]
    assert calls == [(2, 2)] * steps  # [tokens; ended] per step, nothing else


def test_preallocated_cache_layer_holds_what_a_growing_one_does():
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    growing, prefix = DynamicLayer(), torch.randn(1, 2, 3, 4)
    growing.update(prefix, -prefix)
    growing.batch_repeat_interleave(3)
    held = generation._PreallocatedLayer.holding(growing, capacity=6)
    for width in [2, 1]:  # a prompt's own tokens, then one decoding step
        new = torch.randn(3, 2, width, 4)
        expected, got = growing.update(new, new * 2), held.update(new, new * 2)
        assert all(torch.equal(e, g) for e, g in zip(expected, got))
    keep = torch.tensor([0, 2])  # a row ended its answer
    growing.batch_select_indices(keep)
    held.batch_select_indices(keep)
    assert torch.equal(growing.keys, held.keys) and held.get_seq_length() == 6
    with pytest.raises(RuntimeError, match="6 positions"):
        held.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
