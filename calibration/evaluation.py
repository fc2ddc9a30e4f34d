"""Before/after evaluation: refusal rates by kind, task and benchmark, and KL on benign prompts."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from calibration.activations import chat_prompts
from calibration.judge import REFUSE


def refusal_rates(groups: list[str], labels: list[str]) -> dict[str, dict]:
    """Per group: refusal rate, n and a 95% Wilson interval."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for group, label in zip(groups, labels):
        counts[group][0] += label == REFUSE
        counts[group][1] += 1
    return {group: _rate(k, n) for group, (k, n) in sorted(counts.items())}


def _rate(k: int, n: int, z: float = 1.96) -> dict:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": round(p, 4), "n": n, "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]}


@torch.no_grad()
def mean_kl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    reference_mode: Callable[[], ContextManager],
    batch_size: int = 16,
) -> float:
    """Mean per-token KL(reference || model) over the reference's own responses, teacher-forced.

    The reference is the same model inside `reference_mode()` (for a PEFT model: `model.disable_adapter`),
    so no second model is loaded.
    """
    chats = chat_prompts(tokenizer, prompts)
    texts = [c + r + tokenizer.eos_token for c, r in zip(chats, responses)]
    prompt_lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chats]
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    total, count = 0.0, 0
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            # Position j predicts token j+1: score the positions that predict response tokens.
            mask = batch["attention_mask"].clone()
            mask[:, :-1] = mask[:, 1:].clone()
            mask[:, -1] = 0
            for row, length in enumerate(prompt_lengths[start : start + batch_size]):
                mask[row, : length - 1] = 0
            with reference_mode():
                reference = F.log_softmax(model(**batch).logits.float(), -1)
            current = F.log_softmax(model(**batch).logits.float(), -1)
            kl = (reference.exp() * (reference - current)).sum(-1)
            total += (kl * mask).sum().item()
            count += mask.sum().item()
    finally:
        tokenizer.padding_side = side
    return total / max(count, 1)
