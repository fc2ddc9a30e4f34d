"""Checks on the data stage's rows before anything is written: every error names the file, the row and
the field, so a bad input fails in seconds instead of as a silent truncation or an empty subspace later."""

from __future__ import annotations

from pathlib import Path

from refcal.calibration.activations import chat_prompts
from refcal.calibration.kinds import OVER_REFUSAL
from refcal.data_recipes.recipe_error import RecipeError

MIN_SUBSPACE_ROWS = 2  # an over-refusal subspace is estimated from at least this many over-refused rows


def where(row: dict) -> str:
    """A row's origin: a user's "file#row" becomes "file, row N"; a named source keeps its name and row id."""
    origin, _, number = row["source"].partition("#")
    return f"{origin}, row {number}" if number else f"source {origin or row['task']!r}, row {row['id']}"


def fit_prompt_lengths(rows: list[dict], tokenizer, max_length: int, reserve: int) -> tuple[list[dict], int]:
    """Each prompt, in the chat template, must leave `reserve` tokens (the answer) inside `max_length`:
    TRL truncates longer rows silently, which would train on a cut prompt with no answer. A user's row that
    does not fit is an error to fix; a row the recipe built from a named source (a long pool content inside
    a wordy frame) is dropped instead, since the user cannot shorten it. Returns the kept rows and how many
    were dropped."""
    limit = max_length - reserve
    lengths = [
        len(ids)
        for ids in tokenizer(chat_prompts(tokenizer, [r["prompt"] for r in rows]), add_special_tokens=False)[
            "input_ids"
        ]
    ]
    too_long = [(row, n) for row, n in zip(rows, lengths) if n > limit and is_user_row(row)]
    if too_long:
        row, n = too_long[0]
        others = f" ({len(too_long) - 1} more rows too)" if len(too_long) > 1 else ""
        raise RecipeError(
            f"{where(row)}: field 'prompt' is {n} tokens in the chat template, more than max_length {max_length} "
            f"less the {reserve} answer tokens (target_max_new_tokens){others}; shorten it or raise max_length"
        )
    kept = [row for row, n in zip(rows, lengths) if n <= limit]
    return kept, len(rows) - len(kept)


def is_user_row(row: dict) -> bool:
    return "#" in row["source"]  # a user's row is "file#row"; a named source's is its name


def check_calibrated_tasks(rows: list[dict], calibrate_tasks: list[str], task_files: list[str]) -> None:
    """Every task to calibrate needs training rows of its own to estimate its over-refusal subspace."""
    files = {Path(p).stem: p for p in task_files}
    for task in calibrate_tasks:
        if task not in files:
            raise RecipeError(
                f"calibrate_tasks names {task!r}, which is not among the config's tasks ({sorted(files)})"
            )
        count = sum(r["split"] == "train" and r["kind"] == OVER_REFUSAL and r["task"] == task for r in rows)
        if count < MIN_SUBSPACE_ROWS:
            raise RecipeError(
                f"{files[task]}: task {task!r} has {count} over_refusal training row(s); its over-refusal subspace "
                f"needs at least {MIN_SUBSPACE_ROWS} (add rows of kind over_refusal, or raise over_refusal_per_task)"
            )


def check_held_out_tasks(args, task_names: list[str]) -> None:
    """A held-out task must be one of the config's tasks, and no task can be both held out and trained."""
    held_out = set(args.held_out_tasks)
    unknown = sorted(held_out - set(task_names))
    if unknown:
        raise RecipeError(f"held_out_tasks names {unknown}, not among the config's tasks ({sorted(task_names)})")
    trained = set(args.resolved_calibrate_tasks()) | (set(args.organism_tasks) if args.organism else set())
    both = sorted(held_out & trained)
    if both:
        raise RecipeError(
            f"held_out_tasks {both} are also trained (organism_tasks or calibrate_tasks); a task is one or the other"
        )
