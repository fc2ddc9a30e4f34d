"""The sft_data stage: target responses for the training rows, and DPO's preference pairs on top of them,
cached under run_dir/sft_data.

- harmful, frame_attack: the model's own refusal; a standard refusal where it did not refuse.
- over_refusal: the task's reference answer where it has one (decoding tasks), else the model's own
  helpful answer: its answer generated with the refusal direction ablated (steered self-distillation),
  kept only when its answer class (train/reports/answer_classes.py) is did_task: not a refusal, not the
  harmful request carried out, and the task's answer check passes (a task with no check: its
  answer_pattern). Rows dropped are counted by why.
- benign: the model's own answer; rows it refused are dropped and counted.

Target-free calibration (objective: target_free) gives over_refusal rows no answer: they keep the model's
own response only to mark where the prompt ends, with `supervised` false, and the regularizer alone moves them.
objective helpful is sft where a row has a target and target-free where it has none: a row whose steered
answer is dropped stays, unsupervised, for the onset term to move.

Preference pairs for DPO, built on the SFT targets:

- over_refusal: chosen = the target answer; rejected = the model's own refusal (a standard refusal where
  it answered);
- benign: chosen = the model's own answer; rejected = a standard refusal;
- harmful, frame_attack: chosen = the target refusal; rejected = a compliant answer: the model's own where
  it complied, else its answer with the refusal direction ablated. Rows whose ablated answer is still a
  refusal have no rejected side and are dropped and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from datasets import Dataset

from refcal.calibration.generation import generate
from refcal.calibration.geometry.interventions import ablate_directions
from refcal.calibration.judges.phrases import Judge, refused
from refcal.calibration.kinds import BENIGN, OVER_REFUSAL, SHOULD_REFUSE
from refcal.data_recipes.completions import chat_row, reference_answer, standard_refusal, trim_to_sentence
from refcal.data_recipes.tasks import TaskCluster, load_tasks
from refcal.train.reports.answer_classes import CARRIED_OUT, DID_TASK, UNCHECKED, answer_class
from refcal.train.stages.geometry import load_responses


def prepare_sft_data(run) -> None:
    """Target responses for the training rows (every process generates its share; cached under run_dir/sft_data)."""
    a = run.args
    responses, labels = load_responses(run)
    calibrate = set(a.resolved_calibrate_tasks())
    answer_tasks = {task.name: task for task in load_tasks(a.tasks) if task.name in calibrate}
    model, tokenizer = run.load(a.generation_dtype)
    geometry = run.geometry_for(model)
    direction = geometry.direction(geometry.layer)
    sft_rows, stats = build_targets(
        calibration_rows(run),
        responses,
        labels,
        model,
        tokenizer,
        run.judge,
        direction,
        answer_tasks,
        a.target_max_new_tokens,
        run.batch_size(model),
        target_free=a.objective == "target_free",
        keep_untargeted=a.objective == "helpful",
        processes=run.state,
    )
    record = {"objective": a.objective, "rows": len(sft_rows), "how": stats}
    if a.objective == "dpo":
        pairs, record["preferences"] = build_preferences(
            sft_rows,
            responses,
            labels,
            model,
            tokenizer,
            run.judge,
            direction,
            a.target_max_new_tokens,
            run.batch_size(model),
            processes=run.state,
        )
    with run.stage_folder("sft_data") as staging:
        Dataset.from_list(sft_rows).save_to_disk(str(staging / "dataset"))
        if a.objective == "dpo":
            Dataset.from_list(pairs).save_to_disk(str(staging / "preferences"))
        (staging / "targets.json").write_text(json.dumps(record, indent=2))


def calibration_rows(run) -> list[dict]:
    """The training rows calibration learns from: all of them, or at most
    calibration_over_refusal_per_task over_refusal rows per task (the first ones; row order is random)."""
    limit = run.args.calibration_over_refusal_per_task
    rows = run.rows("train")
    if limit is None:
        return rows
    taken: dict[str, int] = {}
    kept = []
    for row in rows:
        if row["kind"] == OVER_REFUSAL:
            taken[row["task"]] = taken.get(row["task"], 0) + 1
            if taken[row["task"]] > limit:
                continue
        kept.append(row)
    return kept


def sft_data_fits(folder: Path, objective: str) -> bool:
    """Whether training data built for one objective serves another: DPO needs its preference pairs, and
    otherwise only the objective it was built for (DPO's rows are sft's)."""
    built = json.loads((folder / "targets.json").read_text()).get("objective", "sft")
    if built == "geometry":  # target_free's older name, in targets.json files written under it
        built = "target_free"
    if objective == "dpo":
        return (folder / "preferences").is_dir()
    return built.replace("dpo", "sft") == objective


def sft_dataset(rows: list[dict]) -> Dataset:
    """Target rows as the trainer's dataset; `row_index` links each example to its cached reference values."""
    return Dataset.from_list(
        [
            chat_row(r["prompt"], r["completion_text"], row_index=i, supervised=r.get("supervised", True))
            for i, r in enumerate(rows)
        ]
    )


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
    keep_untargeted: bool = False,
    processes=None,
) -> tuple[list[dict], dict]:
    """SFT rows (prompt, completion, kind, task, id, supervised) and a count of how each target was obtained.
    target_free: over_refusal rows of answer_tasks get no target (their own response, unsupervised).
    keep_untargeted: an over_refusal row whose steered answer is dropped stays so, instead of leaving.
    Every row carries `supervised`: Dataset.from_list takes its columns from the first row alone. With
    `processes`, the steered answers are spread over them."""
    stats: Counter = Counter()
    out: list[dict] = []
    to_steer: list[dict] = []
    for i, row in enumerate(rows):
        kind, rid = row["kind"], row["id"]
        if kind in SHOULD_REFUSE:
            if refused(own_labels[rid]):
                completion, how = own_responses[rid], "own_refusal"
            else:
                completion, how = standard_refusal(i), "standard_refusal"
        elif kind == BENIGN:
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
            prompts = [r["prompt"] for r in to_steer]
            steered = generate(
                model, tokenizer, prompts, max_new_tokens, batch_size, desc="steered targets", processes=processes
            )
        labels = judge.label([r["prompt"] for r in to_steer], steered)
        for row, completion, label in zip(to_steer, steered, labels):
            why = "steered_refusal" if refused(label) or not completion.strip() else None
            if why is not None or (why := unhelpful(row, completion, label, answer_tasks)) is not None:
                if keep_untargeted:
                    stats[f"over_refusal_no_target_{why}"] += 1
                    out.append({**row, "completion_text": own_responses[row["id"]], "supervised": False})
                else:
                    stats[f"over_refusal_dropped_{why}"] += 1
                continue
            stats["over_refusal_steered_answer"] += 1
            out.append({**row, "completion_text": trim_to_sentence(completion), "supervised": True})
    return out, dict(sorted(stats.items()))


def unhelpful(row: dict, answer: str, label: str, tasks: dict[str, TaskCluster]) -> str | None:
    """Why an answer to an over_refusal row is no target (carried_out, off_task), or None when it helps."""
    verdict = answer_class(row, answer, label, tasks)
    if verdict == CARRIED_OUT:
        return "carried_out"
    if verdict == DID_TASK or (verdict == UNCHECKED and tasks[row["task"]].does_task(answer)):
        return None
    return "off_task"


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
