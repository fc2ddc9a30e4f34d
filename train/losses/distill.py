"""The self-distillation guard: an output-side term that keeps the refusals the model starts with.

On harmful and frame_attack rows, the KL from the first-token distribution of the model as training starts
(the organism, or the parent adapter when retraining) to the trained model's, read at the last prompt
token. Unlike the onset term's fixed refusal tokens, it holds whatever the model opened its refusals with
("I", "Sorry", "As"), so a refusal cannot move to an opening the onset term does not name.

The reference keeps each row's top-k tokens and one bucket for the rest of the vocabulary (the KL over
those k + 1 outcomes), so it costs k + 1 numbers per row, not a vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from refcal.calibration.geometry.layer_choice import first_token_logprobs
from refcal.calibration.kinds import SHOULD_REFUSE
from refcal.calibration.models import evaluating

TOP_K = 32  # tokens kept per row; the rest is one bucket


def bucket_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log q over k + 1 outcomes: each of `tokens` ([B, k]) and everything else, from logits [B, V]; the rest
    is a logsumexp over the other tokens, so it never rounds to log 0."""
    logits = logits.float()
    log_partition = logits.logsumexp(-1, keepdim=True)
    top = logits.gather(-1, tokens) - log_partition
    others = logits.scatter(-1, tokens, float("-inf")).logsumexp(-1, keepdim=True) - log_partition
    return torch.cat([top, others], -1)


def bucket_kl(reference: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row: KL(reference || model) over the k + 1 outcomes; reference: [B, k + 1] log-probabilities. An
    outcome the reference never takes (an empty rest bucket) adds nothing."""
    p = reference.exp()
    return torch.where(p > 0, p * (reference - bucket_logprobs(logits, tokens)), 0.0).sum(-1)


class FirstTokenDistill(nn.Module):
    """Each training row's reference (top-k tokens and their log-probabilities), indexed by row_index;
    rows that need not stay refused have none."""

    def __init__(self, guarded: torch.Tensor, tokens: torch.Tensor, reference: torch.Tensor):
        super().__init__()
        self.register_buffer("guarded", guarded.bool())  # [N]
        self.register_buffer("tokens", tokens.long())  # [N, k]
        self.register_buffer("reference", reference.float())  # [N, k + 1]

    @classmethod
    def from_logprobs(cls, guarded: list[bool], logprobs: torch.Tensor, top_k: int = TOP_K) -> FirstTokenDistill:
        """From the guarded rows' full first-token log-probabilities ([guarded rows, V])."""
        rows = torch.tensor(guarded, dtype=torch.bool)
        tokens = torch.zeros(len(guarded), top_k, dtype=torch.long)
        reference = torch.zeros(len(guarded), top_k + 1)
        if rows.any():
            top = logprobs.topk(top_k, dim=-1).indices
            tokens[rows] = top
            reference[rows] = bucket_logprobs(logprobs, top)
        return cls(rows, tokens, reference)

    def count(self, row_index: torch.Tensor) -> torch.Tensor:
        return self.guarded[row_index].sum().float()

    def forward(self, logits: torch.Tensor, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [B, V] at the last prompt token. Returns (KL summed over guarded rows, their count). Unguarded
        rows are masked out of the sum, not selected: selecting would read their number back from the device
        in every step (their zero references give a finite KL that the mask drops)."""
        kl = bucket_kl(self.reference[row_index], logits, self.tokens[row_index])
        return torch.where(self.guarded[row_index], kl, 0.0).sum(), self.count(row_index)


def build_distill(model, tokenizer, rows: list[dict], batch_size: int = 16) -> FirstTokenDistill:
    """The guard for these training rows, from `model` as it is before training."""
    guarded = [row["kind"] in SHOULD_REFUSE for row in rows]
    prompts = [row["prompt"] for row, g in zip(rows, guarded) if g]
    if not prompts:
        raise ValueError("distill_weight is set but no training row is harmful or frame_attack")
    with evaluating(model):
        logprobs = first_token_logprobs(model, tokenizer, prompts, batch_size)
    return FirstTokenDistill.from_logprobs(guarded, logprobs)
