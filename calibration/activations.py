"""Batched capture of residual-stream activations at the last prompt token."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from calibration.models import decoder_layers


def chat_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each user prompt rendered by the model's chat template, ending where the assistant turn starts."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def encode_left_padded(tokenizer: PreTrainedTokenizerBase, texts: list[str], device) -> dict[str, torch.Tensor]:
    """Left padding puts every prompt's last token at position -1."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in batch.items()}


def layer_output(output) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_last_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    layers: list[int] | None = None,
    batch_size: int = 32,
    desc: str = "capture",
    progress: bool = True,
) -> torch.Tensor:
    """Residual stream after each chosen layer, at the last prompt token: [n_prompts, n_layers, hidden]."""
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        blocks[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, layer_output(out)[:, -1, :].float().cpu())
        )
        for layer in layers
    ]
    texts = chat_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    chunks = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
            batch = encode_left_padded(tokenizer, texts[start : start + batch_size], device)
            model(**batch, use_cache=False)
            chunks.append(torch.stack([captured[layer] for layer in layers], dim=1))
    finally:
        for hook in hooks:
            hook.remove()
    if not chunks:
        return torch.empty(0, len(layers), model.config.hidden_size)
    activations = torch.cat(chunks)
    if not torch.isfinite(activations).all():
        bad = sorted({layers[j] for j in torch.nonzero(~torch.isfinite(activations))[:, 1].tolist()})
        raise FloatingPointError(f"non-finite activations at layer(s) {bad}")
    return activations
