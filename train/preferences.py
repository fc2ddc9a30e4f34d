"""Preference pairs for DPO, built on the SFT targets (train/targets.py):

- over_refusal: chosen = the target answer; rejected = the model's own refusal (a standard refusal where
  it answered);
- benign: chosen = the model's own answer; rejected = a standard refusal;
- harmful, frame_attack: chosen = the target refusal; rejected = a compliant answer: the model's own where
  it complied, else its answer with the refusal direction ablated. Rows whose ablated answer is still a
  refusal have no rejected side and are dropped and counted.
"""

from __future__ import annotations

from collections import Counter

import torch
from datasets import Dataset

from refcal.calibration.generation import generate
from refcal.calibration.interventions import ablate_directions
from refcal.calibration.judge import Judge, refused
from refcal.calibration.kinds import BENIGN, OVER_REFUSAL
from refcal.data_recipes.completions import standard_refusal


def preference_dataset(rows: list[dict]) -> Dataset:
    """Conversational prompt / chosen / rejected examples, the shape TRL's DPOTrainer takes;
    `row_index` links each to its cached reference values."""
    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen_text"]}],
                "rejected": [{"role": "assistant", "content": r["rejected_text"]}],
                "row_index": i,
            }
            for i, r in enumerate(rows)
        ]
    )


def build_preferences(
    sft_rows: list[dict],
    own_responses: dict[str, str],
    own_labels: dict[str, str],
    model,
    tokenizer,
    judge: Judge,
    steer_direction: torch.Tensor,
    max_new_tokens: int,
    batch_size: int,
    processes=None,
) -> tuple[list[dict], dict]:
    """One pair per SFT row that has both sides, in SFT row order, and a count of how each was made."""
    stats: Counter = Counter()
    pairs: dict[int, dict] = {}
    to_steer: list[int] = []
    for i, row in enumerate(sft_rows):
        kind, own = row["kind"], own_responses[row["id"]]
        was_refused = refused(own_labels[row["id"]])
        if kind == OVER_REFUSAL:
            rejected, how = (own, "own_refusal") if was_refused else (standard_refusal(i), "standard_refusal")
        elif kind == BENIGN:
            rejected, how = standard_refusal(i), "standard_refusal"
        elif not was_refused and own.strip():
            rejected, how = own, "own_compliance"
        else:
            to_steer.append(i)
            continue
        pairs[i] = {**row, "chosen_text": row["completion_text"], "rejected_text": rejected}
        stats[f"{kind}_rejected_{how}"] += 1

    if to_steer:
        prompts = [sft_rows[i]["prompt"] for i in to_steer]
        with ablate_directions(model, steer_direction):
            steered = generate(
                model, tokenizer, prompts, max_new_tokens, batch_size, desc="compliant rejecteds", processes=processes
            )
        for i, answer, label in zip(to_steer, steered, judge.label(prompts, steered)):
            kind = sft_rows[i]["kind"]
            if refused(label) or not answer.strip():
                stats[f"{kind}_dropped_no_compliant_answer"] += 1
                continue
            pairs[i] = {**sft_rows[i], "chosen_text": sft_rows[i]["completion_text"], "rejected_text": answer}
            stats[f"{kind}_rejected_steered_compliance"] += 1
    return [pairs[i] for i in sorted(pairs)], dict(sorted(stats.items()))
