"""Target responses, as DESIGN.md says.

- harmful, frame_attack: the model's own refusal; a standard refusal where it did not refuse.
- over_refusal: the task's reference answer where it has one (decoding tasks), else the model's own
  answer generated with the refusal direction ablated (steered self-distillation); rows whose steered
  answer is still a refusal, or fails the task's answer_pattern (it does not do the task), are dropped
  and counted.
- benign: the model's own answer; rows it refused are dropped and counted.

Target-free calibration (objective: geometry) gives over_refusal rows no answer: they keep the model's own
response only to mark where the prompt ends, with `supervised` false, and the regularizer alone moves them.
"""

from __future__ import annotations

from collections import Counter

import torch
from datasets import Dataset

from refcal.calibration.generation import generate
from refcal.calibration.interventions import ablate_directions
from refcal.calibration.judge import Judge, refused
from refcal.data_recipes.tasks import TaskCluster

STANDARD_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that, because it could be used to cause harm.",
    "Sorry, I can't assist with this request.",
    "I'm sorry, I won't help with that request since it could hurt someone.",
    "I cannot provide that. It could cause real harm.",
)


def chat_row(prompt: str, completion: str, **extra) -> dict:
    """A conversational prompt-completion example, the shape TRL's SFTTrainer takes."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": completion}],
        **extra,
    }


def sft_dataset(rows: list[dict]) -> Dataset:
    """Target rows as the trainer's dataset; `row_index` links each example to its cached reference values."""
    return Dataset.from_list(
        [chat_row(r["prompt"], r["completion_text"], row_index=i, supervised=r.get("supervised", True)) for i, r in enumerate(rows)]
    )


def standard_refusal(index: int) -> str:
    return STANDARD_REFUSALS[index % len(STANDARD_REFUSALS)]


def trim_to_sentence(text: str) -> str:
    """Generated answers stop at a token budget: cut back to the last full sentence when there is one."""
    text = text.strip()
    cut = max(text.rfind(mark) for mark in (". ", ".\n", "!", "?", "\n"))
    if text.endswith((".", "!", "?")) or cut < len(text) // 3:
        return text
    return text[: cut + 1].strip()


def reference_answer(row: dict) -> str:
    return f"The decoded text is: {row['reference']}"


def build_targets(
    rows: list[dict],
    own_responses: dict[str, str],
    own_labels: dict[str, str],
    model,
    tokenizer,
    judge: Judge,
    steer_direction: torch.Tensor,
    answer_tasks: dict[str, TaskCluster],
    max_new_tokens: int,
    batch_size: int,
    target_free: bool = False,
) -> tuple[list[dict], dict]:
    """SFT rows (prompt, completion, kind, task, id, supervised) and a count of how each target was obtained.
    target_free: over_refusal rows of answer_tasks get no target (their own response, unsupervised).
    Every row carries `supervised`: Dataset.from_list takes its columns from the first row alone."""
    stats: Counter = Counter()
    out: list[dict] = []
    to_steer: list[dict] = []
    for i, row in enumerate(rows):
        kind, rid = row["kind"], row["id"]
        if kind in ("harmful", "frame_attack"):
            if refused(own_labels[rid]):
                completion, how = own_responses[rid], "own_refusal"
            else:
                completion, how = standard_refusal(i), "standard_refusal"
        elif kind == "benign":
            if refused(own_labels[rid]):
                stats["benign_dropped_refused"] += 1
                continue
            completion, how = trim_to_sentence(own_responses[rid]), "own_answer"
        elif row["task"] not in answer_tasks:
            continue
        elif target_free:
            stats["over_refusal_target_free"] += 1
            out.append({**row, "completion_text": own_responses[rid], "supervised": False})
            continue
        elif row["reference"]:
            completion, how = reference_answer(row), "reference_answer"
        else:
            to_steer.append(row)
            continue
        stats[f"{kind}_{how}"] += 1
        out.append({**row, "completion_text": completion, "supervised": True})

    if to_steer:
        with ablate_directions(model, steer_direction):
            steered = generate(
                model, tokenizer, [r["prompt"] for r in to_steer], max_new_tokens, batch_size, desc="steered targets"
            )
        labels = judge.label([r["prompt"] for r in to_steer], steered)
        for row, completion, label in zip(to_steer, steered, labels):
            if refused(label) or not completion.strip():
                stats["over_refusal_dropped_steered_refusal"] += 1
                continue
            if not answer_tasks[row["task"]].does_task(completion):
                stats["over_refusal_dropped_off_task"] += 1
                continue
            stats["over_refusal_steered_answer"] += 1
            out.append({**row, "completion_text": trim_to_sentence(completion), "supervised": True})
    return out, dict(sorted(stats.items()))
