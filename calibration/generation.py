"""Batched greedy generation of chat responses."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import chat_prompts, encode_left_padded
from refcal.calibration.batching import shrinking_batches


@torch.no_grad()
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
    texts = chat_prompts(tokenizer, prompts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = next(model.parameters()).device
    responses: list[str] = [""] * len(texts)

    def answer(start: int, stop: int) -> torch.Tensor:
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
        return output[:, batch["input_ids"].shape[1] :]

    for start, stop, completions in shrinking_batches(len(order), batch_size, answer, desc, progress):
        for i, sequence in zip(order[start:stop], completions):
            responses[i] = tokenizer.decode(sequence, skip_special_tokens=True).strip()
    return responses
