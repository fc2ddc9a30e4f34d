"""The refusal-onset term: an output-side term beside the geometry regularizer.

The hidden-state terms can collapse held-out over-refusal states at the refusal layer while the model
goes on refusing those prompts (docs/regularizer-study.md). This term acts where refusal is decided,
on the answer's first token: p = P(first answer token opens a refusal), read from the logits at the last
prompt token, with one binary cross-entropy per row:
- target 1 on harmful and frame_attack rows (keep refusing);
- target 0 on over_refusal rows of calibrated tasks and on benign rows (answer).
It needs no answer text, so it serves target-free calibration (objective: target_free): with the
geometry weights at 0 it is the recommended form, selected on validation halves
(bench/results/regularizer_study_onset.md).

The onset tokens come from the training rows themselves: first tokens of the model's own refusals
(harmful and frame_attack targets) that open its answers (benign targets, supervised over_refusal
targets) clearly less often.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from refcal.calibration.activations import chat_prompts
from refcal.calibration.kinds import BENIGN, OVER_REFUSAL, SHOULD_REFUSE
from refcal.data_recipes.completions import chat_row
from refcal.train.losses.regularizer import KEEP_UP, KIND_CODES

MAX_ANSWER_RATIO = 0.25  # an onset token opens at most this fraction of its refusal share of the answers


def split_vocabulary(onset_tokens: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The onset tokens' ids and every other token's, each ascending, in a vocabulary of `vocab`: the two sides
    of onset_loss. Gathering by these ids reads the same logits in the same order a [vocab] mask would select,
    without the mask's per-call read of its size from the device."""
    onset = torch.zeros(vocab, dtype=torch.bool, device=onset_tokens.device)
    onset[onset_tokens] = True
    return onset.nonzero().flatten(), (~onset).nonzero().flatten()


def onset_loss(
    logits: torch.Tensor, onset_tokens: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor
) -> torch.Tensor:
    """Per row: binary cross-entropy of p = softmax(logits)[onset_tokens].sum() against target (0 or 1).

    logits: [B, V] at the last prompt token; onset_tokens: [k] token ids, or the (onset ids, other ids) pair of
    split_vocabulary, built once for a vocabulary (RefusalOnset keeps it); target: [B] floats.
    log p and log(1 - p) are each a logsumexp (over the onset tokens' logits, and over every other
    token's) less the log-partition, so neither saturates: a row refused by a margin of 30 nats still pulls
    towards answering with a gradient of about 1, where 1 - p itself would round to 0."""
    logits = logits.float()
    if isinstance(onset_tokens, tuple):
        onset, others = onset_tokens
    else:
        onset, others = split_vocabulary(onset_tokens, logits.shape[-1])
    log_partition = logits.logsumexp(-1)
    log_p = logits.index_select(-1, onset).logsumexp(-1) - log_partition
    log_not_p = logits.index_select(-1, others).logsumexp(-1) - log_partition
    return -(target * log_p + (1 - target) * log_not_p)


def first_completion_token(tokenizer, prompt: str, completion: str) -> int:
    """The completion's first token as training sees it: right after the chat template's generation prompt."""
    head = chat_prompts(tokenizer, [prompt])[0]
    row = chat_row(prompt, completion)
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    if full_ids[: len(head_ids)] != head_ids or len(full_ids) == len(head_ids):
        raise ValueError(
            f"the chat template does not render the prompt as a prefix of prompt + completion: {prompt[:60]!r}"
        )
    return full_ids[len(head_ids)]


def select_onset_tokens(tokenizer, rows: list[dict], min_refusal_share: float = 0.05) -> list[int]:
    """Token ids that open at least `min_refusal_share` of the rows' refusals (harmful, frame_attack targets)
    and rarely their answers; a share of 0 takes every opening the refusals use."""
    refusals, answers = Counter(), Counter()
    for row in rows:
        if row["kind"] in SHOULD_REFUSE:
            refusals[first_completion_token(tokenizer, row["prompt"], row["completion_text"])] += 1
        elif row["kind"] == BENIGN or (row["kind"] == OVER_REFUSAL and row.get("supervised", True)):
            answers[first_completion_token(tokenizer, row["prompt"], row["completion_text"])] += 1
    n_refusals, n_answers = max(sum(refusals.values()), 1), max(sum(answers.values()), 1)
    chosen = sorted(
        token
        for token, count in refusals.items()
        if count / n_refusals >= min_refusal_share
        and answers[token] / n_answers <= MAX_ANSWER_RATIO * count / n_refusals
    )
    if not chosen:
        raise ValueError(
            "onset term: no token opens the training rows' refusals clearly more often than their answers "
            f"(refusals open with {[tokenizer.decode([t]) for t, _ in refusals.most_common(5)]}); set onset_weight 0"
        )
    return chosen


class RefusalOnset(nn.Module):
    """Onset tokens and each training row's target (1 refuse, 0 answer, -1 no term), indexed by row_index."""

    def __init__(self, onset_tokens: list[int], kinds: list[str], calibrated_rows: list[bool]):
        super().__init__()
        targets = [
            1.0
            if KIND_CODES[kind] in KEEP_UP
            else 0.0
            if kind == BENIGN or (kind == OVER_REFUSAL and calibrated)
            else -1.0
            for kind, calibrated in zip(kinds, calibrated_rows)
        ]
        self.register_buffer("onset_tokens", torch.tensor(onset_tokens))
        self.register_buffer("target", torch.tensor(targets))
        # the vocabulary split into onset and other token ids: built on the first forward, when the logits
        # tell the vocabulary's size, then kept (it moves with the module)
        self.register_buffer("onset_ids", None, persistent=False)
        self.register_buffer("other_ids", None, persistent=False)

    def count(self, row_index: torch.Tensor) -> torch.Tensor:
        """Rows with a target among these."""
        return (self.target[row_index] >= 0).sum().float()

    def vocabulary(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The onset tokens' ids and every other token's in a vocabulary of `vocab` (split_vocabulary), kept."""
        if self.other_ids is None or len(self.onset_ids) + len(self.other_ids) != vocab:
            self.onset_ids, self.other_ids = split_vocabulary(self.onset_tokens, vocab)
        return self.onset_ids, self.other_ids

    def forward(self, logits: torch.Tensor, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: [B, V] at the last prompt token. Returns (sum over rows with a target, their count). Rows
        without one are masked out of the sum, not selected: selecting would read their number back from the
        device in every step."""
        target = self.target[row_index]
        loss = onset_loss(logits, self.vocabulary(logits.shape[-1]), target.clamp_min(0))
        return torch.where(target >= 0, loss, 0.0).sum(), self.count(row_index)


def build_onset(tokenizer, rows: list[dict], calibrate: set[str], min_refusal_share: float = 0.05) -> RefusalOnset:
    return RefusalOnset(
        select_onset_tokens(tokenizer, rows, min_refusal_share),
        [r["kind"] for r in rows],
        [r["kind"] == OVER_REFUSAL and r["task"] in calibrate for r in rows],
    )
