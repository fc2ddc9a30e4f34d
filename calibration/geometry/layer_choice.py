"""Choose the refusal layer by causal effect, as Arditi et al. do.

For each candidate layer, ablate that layer's harmful direction at every layer and position and measure
(a) the refusal score on held-out harmful prompts: log-odds of the model's refusal-opening tokens at the
first response position, and (b) the KL of the next-token distribution on held-out benign prompts.
The chosen layer removes the most refusal among those whose KL stays under a bound.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import chat_prompts, encode_left_padded
from refcal.calibration.generation import (
    cache_keyword,
    forward_after_prefix,
    prefix_cache,
    prefix_cacheable,
    shared_prefix_length,
)
from refcal.calibration.geometry.directions import Geometry
from refcal.calibration.geometry.interventions import ablate_directions
from refcal.calibration.infra.profiling import note
from refcal.calibration.infra.sharding import Processes, deal, one_process, shares, sum_over


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
    """Per prompt: log p(refusal token) - log p(anything else). logprobs: [n, vocab] -> [n]."""
    return refusal_log_odds(torch.logsumexp(logprobs[:, tokens], dim=-1))


def refusal_log_odds(refuse: torch.Tensor) -> torch.Tensor:
    """log p - log(1 - p) from log p ([n] -> [n]), with p kept below 1."""
    return refuse - torch.log1p(-refuse.exp().clamp(max=1 - 1e-6))


@dataclass
class PromptBatch:
    rows: torch.Tensor  # [b] the prompts' indices in the encoded list
    input_ids: torch.Tensor  # [b, w] each prompt's tokens after the shared prefix, left padded
    attention_mask: torch.Tensor  # [b, p + w] the prefix, then padding (0) and the prompt's own tokens (1)
    kl_at: torch.Tensor  # [k] rows of this batch whose whole distribution is scored
    kl_rows: torch.Tensor  # [k] their indices among the prompts so scored


@dataclass
class EncodedPrompts:
    """Chat prompts tokenized and padded once, for many forward passes over the same prompts (one per
    candidate layer). The `prefix` every prompt starts with (the chat template's header) runs once per pass
    and its keys and values serve every batch, as in calibration.generation."""

    prefix: torch.Tensor  # [1, p]; p = 0 where nothing is shared or the model's cache cannot be shared
    batches: list[PromptBatch]
    size: int  # prompts
    kl_size: int  # prompts whose whole distribution is scored


def encode_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    kl: list[bool],
    batch_size: int = 32,
) -> EncodedPrompts:
    """`prompts` in batches of similar length, on the model's device; `kl` marks the prompts whose whole
    first-token distribution `first_token_scores` returns (or compares with a reference)."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in chat_prompts(tokenizer, prompts)]
    prefix = shared_prefix_length(ids) if ids and prefix_cacheable(model, max(map(len, ids))) else 0
    kl_rows = (torch.tensor(kl, dtype=torch.long).cumsum(0) - 1).tolist()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        rest = [ids[i][prefix:] for i in chosen]
        width = max(len(r) for r in rest)
        at = [j for j, i in enumerate(chosen) if kl[i]]
        tensors = (
            chosen,
            [[pad] * (width - len(r)) + r for r in rest],
            [[1] * prefix + [0] * (width - len(r)) + [1] * len(r) for r in rest],
            at,
            [kl_rows[chosen[j]] for j in at],
        )
        batches.append(PromptBatch(*(torch.tensor(t, dtype=torch.long, device=device) for t in tensors)))
    prefix_ids = torch.tensor([ids[0][:prefix] if ids else []], dtype=torch.long, device=device)
    return EncodedPrompts(prefix_ids, batches, len(ids), sum(kl))


@torch.inference_mode()
def first_token_scores(
    model: PreTrainedModel, encoded: EncodedPrompts, tokens: list[int], reference: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, for the first response token: log p(any of `tokens`) [n]; and for the prompts marked for
    KL, their log-probabilities [m, vocab] without a `reference`, or KL(reference || model) [m] with one
    (`reference`: [m, vocab], an earlier call's log-probabilities). float32, on the model's device.

    Each prompt's results are its own whatever the batching, so a process may score a share of the
    prompts and the shares be gathered."""
    device = encoded.prefix.device
    vocab = model.config.get_text_config().vocab_size
    # zeros where a prompt is not in `encoded.batches` (another process's share): a sum over processes gathers
    refuse = torch.zeros(encoded.size, device=device)
    scored = torch.zeros((encoded.kl_size, vocab) if reference is None else encoded.kl_size, device=device)
    tokens = torch.tensor(tokens, dtype=torch.long, device=device)
    # keys and values of the shared prefix under the model's current hooks (an ablation acts at its positions too)
    cache = prefix_cache(model, cache_keyword(model), encoded.prefix) if encoded.prefix.shape[1] else None
    for batch in encoded.batches:
        logits = last_logits(model, batch, cache)  # [b, vocab]
        normaliser = torch.logsumexp(logits, dim=-1)  # [b]: log-softmax needs no [b, vocab] result for this
        refuse[batch.rows] = torch.logsumexp(logits[:, tokens], dim=-1) - normaliser
        logprobs = logits[batch.kl_at] - normaliser[batch.kl_at, None]  # [k, vocab], the KL prompts' only
        if reference is None:
            scored[batch.kl_rows] = logprobs
        else:
            kl = F.kl_div(logprobs, reference[batch.kl_rows], log_target=True, reduction="none")
            scored[batch.kl_rows] = kl.sum(-1)
    return refuse, scored


def last_logits(model: PreTrainedModel, batch: PromptBatch, cache: DynamicCache | None) -> torch.Tensor:
    """Next-token logits at each prompt's last token (left padding puts it at -1): [b, vocab] float32."""
    if cache is None:
        output = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=1
        )
        return output.logits[:, -1].float()
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(len(batch.rows))
    keyword = cache_keyword(model)
    return forward_after_prefix(model, keyword, batch.input_ids, batch.attention_mask, cache, logits_to_keep=1).float()


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
    processes: Processes | None = None,
) -> tuple[int, list[dict]]:
    """The candidate whose ablation lowers the harmful prompts' refusal score most among those whose mean
    benign KL stays within `kl_max` (all of them where none does), and every candidate's scores. With
    `processes`, each scores every N-th batch and the per-prompt scores are summed over them (each prompt's
    are nonzero on one process only), so every process gets one process's table."""
    prompts = harmful_prompts + benign_prompts
    harmful = slice(0, len(harmful_prompts))
    encoded = encode_prompts(
        model, tokenizer, prompts, [False] * len(harmful_prompts) + [True] * len(benign_prompts), batch_size
    )
    encoded = replace(encoded, batches=deal(encoded.batches, processes))
    note(prompts=len(prompts), prompts_per_process=shares(len(prompts), batch_size, processes))
    # this process's base log-probabilities stay its own: it compares only its own prompts with them
    base_refuse, base_benign = first_token_scores(model, encoded, tokens)
    base_harmful = refusal_log_odds(sum_over(base_refuse, processes)[harmful])
    table = []
    show = one_process(processes) or processes.is_main_process
    for layer in tqdm(candidates, desc="layer choice", leave=False, disable=not show):
        with ablate_directions(model, geometry.direction(layer)):
            refuse, kl = (sum_over(t, processes) for t in first_token_scores(model, encoded, tokens, base_benign))
        score = refusal_log_odds(refuse[harmful])
        values = torch.stack([score.mean(), (base_harmful - score).mean(), kl.mean()]).tolist()  # one read back
        table.append(dict(zip(("layer", "refusal_score", "refusal_score_drop", "benign_kl"), (layer, *values))))
    allowed = [row for row in table if row["benign_kl"] <= kl_max] or table
    best = min(allowed, key=lambda row: row["refusal_score"])
    return best["layer"], table
