"""Before/after evaluation: refusal rates by kind, task and benchmark, and KL on benign prompts."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import chat_prompts
from refcal.calibration.judge import refused


def refusal_rates(groups: list[str], labels: list[str]) -> dict[str, dict]:
    """Per group: refusal rate, n and a 95% Wilson interval."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for group, label in zip(groups, labels):
        counts[group][0] += refused(label)
        counts[group][1] += 1
    return {group: wilson_rate(k, n) for group, (k, n) in sorted(counts.items())}


def wilson_rate(k: int, n: int, z: float = 1.96) -> dict:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"rate": round(p, 4), "n": n, "ci95": [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]}


def mean_kl(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    reference_mode: Callable[[], AbstractContextManager] = nullcontext,
    current_mode: Callable[[], AbstractContextManager] = nullcontext,
    batch_size: int = 16,
) -> float:
    """Mean per-token KL(reference || current) over the reference's own responses, teacher-forced.

    Both are the same model, inside `reference_mode()` and `current_mode()`: for a PEFT model the reference
    mode is `model.disable_adapter`; for a hook intervention the current mode applies the hooks. No second
    model is loaded.
    """
    total, count = kl_sums(model, tokenizer, prompts, responses, reference_mode, current_mode, batch_size)
    return total / max(count, 1)


@torch.no_grad()
def kl_sums(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    reference_mode: Callable[[], AbstractContextManager] = nullcontext,
    current_mode: Callable[[], AbstractContextManager] = nullcontext,
    batch_size: int = 16,
) -> tuple[float, int]:
    """Summed per-token KL and the number of tokens scored (to pool groups that run under different hooks)."""
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
            with current_mode():
                current = F.log_softmax(model(**batch).logits.float(), -1)
            kl = (reference.exp() * (reference - current)).sum(-1)
            total += (kl * mask).sum().item()
            count += mask.sum().item()
    finally:
        tokenizer.padding_side = side
    return total, int(count)


def selectivity(over_before: float, over_after: float, harmful_before: float, harmful_after: float) -> dict:
    """Over-refusal drop / harmful-refusal drop, in rate points. Where harmful refusal did not fall the
    ratio is undefined: it is reported as None with the reason, never as infinity."""
    over_drop, harmful_drop = over_before - over_after, harmful_before - harmful_after
    result = {"over_refusal_drop": round(over_drop, 4), "harmful_drop": round(harmful_drop, 4)}
    if harmful_drop <= 0:
        return {
            **result,
            "selectivity": None,
            "note": "harmful refusal did not fall" if harmful_drop == 0 else "harmful refusal rose",
        }
    return {**result, "selectivity": round(over_drop / harmful_drop, 3)}
