"""Before/after evaluation: refusal rates by kind, task and benchmark, and KL on benign prompts."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from statistics import NormalDist

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import backbone, chat_prompts
from refcal.calibration.judges.phrases import refused


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


def paired_loss_bound(lost: int, gained: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a paired loss: of n prompts answered before and after, `lost` were
    safe before and not after, `gained` the other way; the loss is (lost - gained) / n. Tango's score
    interval for the difference of paired proportions (Stat Med 1998), which keeps its coverage at small n
    and with no discordant pair, where a Wald bound collapses to the point estimate. No prompt: 1."""
    if n <= 0:
        return 1.0
    z = NormalDist().inv_cdf(confidence)

    def score(delta: float) -> float:  # decreases in delta; the bound is where it meets -z
        w = -lost - gained + (2 * n - lost + gained) * delta
        q = (math.sqrt(w * w + 8 * n * gained * delta * (1 - delta)) - w) / (4 * n)  # restricted MLE of gained
        spread = n * (2 * q + delta * (1 - delta))
        return (lost - gained - n * delta) / math.sqrt(spread) if spread > 0 else 0.0

    low, high = (lost - gained) / n, 1.0
    if score(low) <= -z:
        return low
    for _ in range(60):  # bisection to well below a thousandth of a point
        middle = (low + high) / 2
        low, high = (middle, high) if score(middle) > -z else (low, middle)
    return high


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


@torch.inference_mode()
def kl_sums(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    reference_mode: Callable[[], AbstractContextManager] = nullcontext,
    current_mode: Callable[[], AbstractContextManager] = nullcontext,
    batch_size: int = 16,
) -> tuple[float, int]:
    """Summed per-token KL and the number of tokens scored (to pool groups that run under different hooks).

    The vocabulary projection runs only at the scored positions (those that predict a response token or
    the end of turn): the prompt's positions, most of each row, never reach the LM head.
    """
    chats = chat_prompts(tokenizer, prompts)
    ids = [
        tokenizer(c + r + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for c, r in zip(chats, responses)
    ]
    prompt_lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chats]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = right_padded([ids[i] for i in chosen], pad, device)
        rows, positions = scored_positions([len(ids[i]) for i in chosen], [prompt_lengths[i] for i in chosen])
        rows, positions = rows.to(device, non_blocking=True), positions.to(device, non_blocking=True)
        with reference_mode():
            reference = F.log_softmax(logits_at(model, batch, rows, positions), -1)
        with current_mode():
            current = F.log_softmax(logits_at(model, batch, rows, positions), -1)
        total += F.kl_div(current, reference, log_target=True, reduction="sum").double()
        count += len(rows)
    return total.item(), count


def right_padded(ids: list[list[int]], pad: int, device) -> dict[str, torch.Tensor]:
    """Token rows padded on the right: input_ids and attention_mask, [b, longest]."""
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    # non-blocking: a copy from the host need not wait for the previous batch's work on the device
    return {"input_ids": input_ids.to(device, non_blocking=True), "attention_mask": mask.to(device, non_blocking=True)}


def scored_positions(lengths: list[int], prompt_lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of each position that predicts a response token: position j predicts token j + 1, so
    a row of n tokens whose prompt takes p scores positions p - 1 to n - 2. Two [m] index tensors."""
    spans = [torch.arange(p - 1, n - 1) for n, p in zip(lengths, prompt_lengths)]
    rows = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor([len(s) for s in spans]))
    return rows, torch.cat(spans)


def logits_at(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], rows: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Next-token logits at (rows, positions) of a right-padded batch: [m, vocab] float32. The decoder runs
    over the whole batch, the LM head over those m positions only."""
    hidden = backbone(model)(**batch, use_cache=False).last_hidden_state  # [b, tokens, hidden]
    return output_logits(model, hidden[rows, positions]).float()


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states [..., hidden] -> [..., vocab], with Gemma-2's logit soft-capping.
    The output embeddings module itself is called, so a LoRA adapter on it (when targeted) takes part."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = base.get_output_embeddings()(hidden)
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


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
