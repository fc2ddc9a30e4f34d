"""Choose the refusal layer by causal effect, as Arditi et al. do.

For each candidate layer, ablate that layer's harmful direction at every layer and position and measure
(a) the refusal score on held-out harmful prompts: log-odds of the model's refusal-opening tokens at the
first response position, and (b) the KL of the next-token distribution on held-out benign prompts.
The chosen layer removes the most refusal among those whose KL stays under a bound.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import chat_prompts, encode_left_padded
from refcal.calibration.geometry import Geometry
from refcal.calibration.interventions import ablate_directions


def refusal_tokens(tokenizer: PreTrainedTokenizerBase, refusals: list[str], top: int = 4) -> list[int]:
    """The most common first tokens of the model's own refusals (e.g. 'I', 'Sorry')."""
    firsts = Counter()
    for text in refusals:
        ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        if ids:
            firsts[ids[0]] += 1
    if not firsts:
        raise ValueError("no refusals to take refusal tokens from: the model refused none of the harmful rows")
    return [token for token, _ in firsts.most_common(top)]


@torch.no_grad()
def first_token_logprobs(model, tokenizer, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Log-probabilities of the first response token: [n, vocab]."""
    texts = chat_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encode_left_padded(tokenizer, texts[start : start + batch_size], device)
        # logits_to_keep: the vocabulary projection at the last position only, not at every prompt token
        logits = model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        out.append(F.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


def refusal_score(logprobs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Per prompt: log p(refusal token) - log p(anything else)."""
    refuse = torch.logsumexp(logprobs[:, tokens], dim=-1)
    other = torch.log1p(-refuse.exp().clamp(max=1 - 1e-6))
    return refuse - other


def choose_layer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    geometry: Geometry,
    harmful_prompts: list[str],
    benign_prompts: list[str],
    tokens: list[int],
    candidates: list[int],
    kl_max: float = 0.2,
    batch_size: int = 32,
) -> tuple[int, list[dict]]:
    base_harmful = refusal_score(first_token_logprobs(model, tokenizer, harmful_prompts, batch_size), tokens)
    base_benign = first_token_logprobs(model, tokenizer, benign_prompts, batch_size)
    table = []
    for layer in tqdm(candidates, desc="layer choice", leave=False):
        with ablate_directions(model, geometry.direction(layer)):
            harmful = refusal_score(first_token_logprobs(model, tokenizer, harmful_prompts, batch_size), tokens)
            benign = first_token_logprobs(model, tokenizer, benign_prompts, batch_size)
        kl = F.kl_div(benign, base_benign, log_target=True, reduction="batchmean").item()
        table.append(
            {
                "layer": layer,
                "refusal_score": harmful.mean().item(),
                "refusal_score_drop": (base_harmful - harmful).mean().item(),
                "benign_kl": kl,
            }
        )
    allowed = [row for row in table if row["benign_kl"] <= kl_max] or table
    best = min(allowed, key=lambda row: row["refusal_score"])
    return best["layer"], table
