"""Batched capture of residual-stream activations at the last prompt token (or the prompt's last few)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.infra.artifacts import atomic_file
from refcal.calibration.infra.batching import shrinking_batches
from refcal.calibration.models import decoder_layers


class NonFiniteActivations(FloatingPointError):
    """NaN or inf in the residual stream; `rows` (prompt indices) and `layers` say where."""

    def __init__(self, message: str, rows: list[int], layers: list[int]):
        super().__init__(message)
        self.rows, self.layers = rows, layers


def chat_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each user prompt rendered by the model's chat template, ending where the assistant turn starts."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def template_tail_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens the chat template puts after the user's message (end of turn, assistant header):
    the post-instruction positions, of which the last prompt token is the last."""
    marker = "refcal-end-of-instruction"
    text = chat_prompts(tokenizer, [marker])[0]
    tail = text[text.rindex(marker) + len(marker) :]
    return max(1, len(tokenizer(tail, add_special_tokens=False)["input_ids"]))


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


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The transformer without its LM head: capture needs hidden states, and skipping the vocabulary
    logits ([batch, tokens, vocab], the largest tensor of a forward pass) saves their time and memory."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


@torch.no_grad()
def last_token_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    layers: list[int],
    batch_size: int = 32,
    desc: str = "capture",
    progress: bool = True,
    tail: int | None = None,
) -> Iterator[torch.Tensor]:
    """Residual stream after each of `layers`, at the last prompt token, one batch at a time:
    [batch, n_layers, hidden] float32 on the CPU, checked finite. With `tail`, at the last `tail` prompt
    tokens: [batch, tail, n_layers, hidden]."""
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    keep = slice(-1, None) if tail is None else slice(-tail, None)

    def keep_last_token(layer: int):
        def hook(_module, _inputs, output):
            # a copy of the last tokens only: a view would keep the layer's whole output alive
            captured[layer] = layer_output(output)[:, keep, :].float().cpu().contiguous()

        return hook

    hooks = [blocks[layer].register_forward_hook(keep_last_token(layer)) for layer in layers]
    texts = chat_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    body = backbone(model)

    def forward(start: int, stop: int) -> torch.Tensor:
        body(**encode_left_padded(tokenizer, texts[start:stop], device), use_cache=False)
        return torch.stack([captured[layer] for layer in layers], dim=2)  # [batch, positions, layers, hidden]

    try:
        for start, _, chunk in shrinking_batches(len(texts), batch_size, forward, desc, progress):
            if not torch.isfinite(chunk).all():
                bad = sorted({layers[j] for j in torch.nonzero(~torch.isfinite(chunk))[:, 2].tolist()})
                rows = sorted({start + i for i in torch.nonzero(~torch.isfinite(chunk))[:, 0].tolist()})
                raise NonFiniteActivations(
                    f"non-finite activations at layer(s) {bad} (prompts {start}-{start + len(chunk) - 1})", rows, bad
                )
            yield chunk[:, 0] if tail is None else chunk
    finally:
        for hook in hooks:
            hook.remove()


def _layers(model: PreTrainedModel, layers: list[int] | None) -> list[int]:
    return list(range(len(decoder_layers(model)))) if layers is None else list(layers)


def capture_last_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    layers: list[int] | None = None,
    batch_size: int = 32,
    desc: str = "capture",
    progress: bool = True,
    tail: int | None = None,
) -> torch.Tensor:
    """Residual stream after each chosen layer, at the last prompt token: [n_prompts, n_layers, hidden];
    with `tail`, at the last `tail` prompt tokens: [n_prompts, tail, n_layers, hidden].

    Preallocated and filled batch by batch, so memory holds the result once (no list of chunks to join).
    """
    layers = _layers(model, layers)
    shape = (len(layers), model.config.hidden_size) if tail is None else (tail, len(layers), model.config.hidden_size)
    activations = torch.empty(len(prompts), *shape)
    row = 0
    for chunk in last_token_batches(model, tokenizer, prompts, layers, batch_size, desc, progress, tail):
        activations[row : row + len(chunk)] = chunk
        row += len(chunk)
    return activations


def stream_last_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    path: str | Path,
    layers: list[int] | None = None,
    batch_size: int = 32,
    key: str = "last_token",
    desc: str = "capture",
    progress: bool = True,
) -> Path:
    """Capture straight into a safetensors file, one batch at a time, for sets too large to hold in memory.

    The file holds one float32 tensor `key` of shape [n_prompts, n_layers, hidden] (read it lazily with
    `safetensors.safe_open`); memory stays at one batch whatever the number of prompts. Written beside
    `path` and renamed into place, so a killed capture leaves no partial file.
    """
    layers = _layers(model, layers)
    shape = [len(prompts), len(layers), model.config.hidden_size]
    nbytes = 4 * shape[0] * shape[1] * shape[2]
    header = json.dumps({key: {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        for chunk in last_token_batches(model, tokenizer, prompts, layers, batch_size, desc, progress):
            handle.write(chunk.contiguous().numpy().astype("<f4", copy=False).tobytes())
    return Path(path)
