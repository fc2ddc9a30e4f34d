"""Batched greedy generation of chat responses, optionally with the residual stream at each prompt's last
token, read off the generation's own prefill (no second forward pass over the prompts)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import NonFiniteActivations, chat_prompts, encode_left_padded, layer_output
from refcal.calibration.batching import shrinking_batches
from refcal.calibration.models import decoder_layers
from refcal.calibration.profiling import section


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    desc: str = "generate",
    progress: bool = True,
) -> list[str]:
    """Greedy responses, one per prompt, in order. Prompts are sorted by length so batches pad little;
    batch_size is the largest tried (halved on out-of-memory)."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress, None)[0]


def generate_with_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    desc: str = "generate",
    progress: bool = True,
) -> tuple[list[str], torch.Tensor]:
    """`generate`, plus the residual stream after every decoder layer at each prompt's last token:
    [n_prompts, n_layers, hidden] float32 on the CPU, in the model's own dtype's precision, checked finite.
    The prefill computes exactly these states (left padding puts every last prompt token at position -1),
    so they cost no forward pass of their own."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress, decoder_layers(model))


@torch.no_grad()
def _generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress, blocks):
    texts = chat_prompts(tokenizer, prompts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = next(model.parameters()).device
    responses: list[str] = [""] * len(texts)
    activations = None if blocks is None else torch.empty(len(texts), len(blocks), model.config.hidden_size)
    prefill: dict[int, torch.Tensor] = {}

    def keep_prefill(layer: int):
        def hook(_module, _inputs, output):
            hidden = layer_output(output)
            if layer not in prefill and hidden.shape[1] > 1:  # the prompt's pass, not a one-token decoding step
                prefill[layer] = hidden[:, -1].float().cpu()

        return hook

    def answer(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        prefill.clear()  # a batch retried after out-of-memory starts again
        batch = encode_left_padded(tokenizer, [texts[i] for i in order[start:stop]], device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        states = None if blocks is None else torch.stack([prefill[layer] for layer in range(len(blocks))], dim=1)
        return output[:, batch["input_ids"].shape[1] :], states

    hooks = [] if blocks is None else [block.register_forward_hook(keep_prefill(i)) for i, block in enumerate(blocks)]
    try:
        with section(f"generation: {desc}"):
            for start, stop, (completions, states) in shrinking_batches(len(order), batch_size, answer, desc, progress):
                for j, (i, sequence) in enumerate(zip(order[start:stop], completions)):
                    responses[i] = tokenizer.decode(sequence, skip_special_tokens=True).strip()
                    if states is not None:
                        activations[i] = states[j]
    finally:
        for hook in hooks:
            hook.remove()
    if activations is not None and not torch.isfinite(activations).all():
        bad = torch.nonzero(~torch.isfinite(activations))
        rows, layers = sorted(set(bad[:, 0].tolist())), sorted(set(bad[:, 1].tolist()))
        raise NonFiniteActivations(f"non-finite activations at layer(s) {layers}", rows, layers)
    return responses, activations
