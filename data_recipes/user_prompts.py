"""A user's own task cluster: one prompt per row with its kind, from a JSONL, CSV or JSON file or a Hugging
Face dataset, named by a task YAML's `prompts` field (docs in README, "Your own task cluster").

Each row gives `prompt` and `kind` (over_refusal, harmful, benign or frame_attack); optional `task` keeps
only this cluster's rows of a shared file, and optional `split` (train, val, eval) places a row. Every
error names the file, the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refcal.calibration.kinds import KINDS
from refcal.data_recipes.recipe_error import RecipeError
from refcal.data_recipes.sources import read_records
from refcal.data_recipes.tasks import SPLITS, TaskCluster


@dataclass(frozen=True)
class PromptRow:
    text: str
    kind: str
    split: str | None  # None: the recipe splits it
    origin: str  # the file (or hf:name) it came from
    row: int  # its row number there, counted from 1


def load_prompt_rows(task: TaskCluster) -> list[PromptRow]:
    records, origin, columns = _records(task)
    if task.prompt_column not in columns and columns:
        raise RecipeError(f"{origin}: missing column {task.prompt_column!r} (columns: {sorted(columns)})")
    rows = []
    for number, record in records:
        owner = record.get(task.task_column)
        if owner not in (None, "") and str(owner).strip() != task.name:  # another cluster's row of a shared file
            continue
        text, kind = record.get(task.prompt_column), record.get(task.kind_column)
        if not isinstance(text, str) or not text.strip():
            raise RecipeError(f"{origin}: row {number}: field {task.prompt_column!r} is missing or empty")
        if kind not in KINDS:
            raise RecipeError(f"{origin}: row {number}: field {task.kind_column!r} is {kind!r}; allowed: {list(KINDS)}")
        split = record.get(task.split_column)
        if split in ("", None):
            split = None
        elif split not in SPLITS:
            raise RecipeError(
                f"{origin}: row {number}: field {task.split_column!r} is {split!r}; allowed: {list(SPLITS)}"
            )
        rows.append(PromptRow(text.strip(), kind, split, origin, number))
    if not rows:
        raise RecipeError(
            f"{origin}: no rows for task {task.name!r} (column {task.task_column!r} names other tasks, or the file is empty)"
        )
    return rows


def _records(task: TaskCluster) -> tuple[list[tuple[int, dict]], str, set[str]]:
    """(row number, record) pairs, where they came from, and the column names (empty when rows may differ)."""
    if task.prompts.startswith("hf:"):
        from datasets import load_dataset

        name = task.prompts[3:]
        origin = f"hf:{name}[{task.prompts_split}]"
        try:
            dataset = load_dataset(name, split=task.prompts_split)
        except Exception as error:  # the hub, the split or the files: datasets raises many kinds
            raise RecipeError(f"task {task.name!r}: field 'prompts': cannot load {origin}: {error}") from error
        return list(enumerate(dataset, start=1)), origin, set(dataset.column_names)
    path = Path(task.prompts)
    if not path.exists():
        raise RecipeError(f"task {task.name!r}: field 'prompts': file not found: {path}")
    return read_records(path, task.prompt_column), str(path), set()
