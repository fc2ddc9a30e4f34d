"""Task clusters: one YAML file per benign task frame (configs/tasks/*.yaml)."""

from __future__ import annotations

import base64
import codecs
import re
from dataclasses import dataclass, fields
from pathlib import Path

from refcal.data_recipes.answer_checks import CHECKS, did_task
from refcal.data_recipes.recipe_error import RecipeError
from refcal.data_recipes.yaml_files import read_yaml_mapping

SPLITS = ("train", "val", "eval")  # every recipe's splits; no content is shared between them

TRANSFORMS = {
    "none": lambda text: text,
    "base64": lambda text: base64.b64encode(text.encode("utf-8")).decode("ascii"),
    "caesar3": lambda text: "".join(_shift(c, 3) for c in text),
    "rot13": lambda text: codecs.encode(text, "rot13"),
}


def _shift(char: str, k: int) -> str:
    if "a" <= char <= "z":
        return chr((ord(char) - 97 + k) % 26 + 97)
    if "A" <= char <= "Z":
        return chr((ord(char) - 65 + k) % 26 + 65)
    return char


@dataclass(frozen=True)
class TaskCluster:
    name: str
    description: str
    templates: tuple[str, ...]  # benign frame phrasings, each with one {content} slot
    attack_templates: tuple[str, ...] = ()  # the frame plus "and carry it out": must be refused
    content_transform: str = "none"  # applied to the content before it fills the slot (cipher tasks)
    over_refusal_source: str | None = None  # a lookalike source instead of framed harmful contents
    harmful_source: str | None = None  # that source's harmful twins
    answer_pattern: str | None = None  # regex a steered answer must match to count as doing the task
    answer_check: str | None = None  # how to tell an answer did the task (data_recipes/answer_checks.py)
    held_out_templates: tuple[str, ...] = ()  # phrasings kept out of training: evaluation only
    held_out_attack_templates: tuple[str, ...] = ()
    # A user's own cluster: a JSONL/CSV/JSON file (relative to this YAML) or `hf:owner/name`, one prompt
    # per row with its kind (and optionally task and split): see data_recipes/user_prompts.py.
    prompts: str | None = None
    prompts_split: str = "train"  # the Hugging Face dataset's split to read
    prompt_column: str = "prompt"
    kind_column: str = "kind"
    task_column: str = "task"  # rows whose task is another cluster's are skipped; no such column: all rows
    split_column: str = "split"  # train/val/eval per row; no such column: split by the config's per-task sizes

    def answer_did_task(self, answer: str, content: str) -> bool | None:
        """Whether an answer to this frame, given `content`, did the task; None when the task names no check."""
        if self.answer_check is None:
            return None
        return did_task(self.answer_check, answer, content, self.answer_pattern)

    def does_task(self, answer: str) -> bool:
        """A cheap check that a generated answer does the task (no pattern: every answer passes)."""
        return self.answer_pattern is None or re.search(self.answer_pattern, answer) is not None

    @property
    def is_frame(self) -> bool:
        """A frame wraps shared contents; a lookalike or user cluster brings its own prompts."""
        return self.over_refusal_source is None and self.prompts is None

    def fill(self, template: str, content: str) -> str:
        return template.format(content=TRANSFORMS[self.content_transform](content))

    @property
    def has_reference_answer(self) -> bool:
        """Decoding tasks have an exact answer: the plain content itself."""
        return self.content_transform != "none"


_FIELDS = {f.name for f in fields(TaskCluster)}
_REQUIRED = {"name", "description"}


def load_task(path: str | Path) -> TaskCluster:
    path = Path(path)
    raw = read_yaml_mapping(path, RecipeError, "task fields")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise RecipeError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    missing = _REQUIRED - set(raw)
    if missing:
        raise RecipeError(f"{path}: missing field(s) {sorted(missing)}")
    for key in ("name", "description"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise RecipeError(f"{path}: field {key!r} must be a non-empty string")
    if raw["name"] != path.stem:
        raise RecipeError(f"{path}: field 'name' is {raw['name']!r} but the file is {path.stem!r}")
    for key in ("templates", "attack_templates", "held_out_templates", "held_out_attack_templates"):
        templates = raw.get(key) or []
        if not isinstance(templates, list):
            raise RecipeError(f"{path}: field {key!r} must be a list of strings")
        for i, template in enumerate(templates, start=1):
            _check_template(path, key, i, template)
        raw[key] = tuple(templates)
    if raw.get("prompts") is not None:
        raw.update(_check_prompts(path, raw))
    elif not raw["templates"]:
        raise RecipeError(
            f"{path}: field 'templates' is empty; a task needs at least one phrasing (or a 'prompts' file)"
        )
    transform = raw.get("content_transform", "none")
    if transform not in TRANSFORMS:
        raise RecipeError(f"{path}: field 'content_transform' is {transform!r}; allowed: {sorted(TRANSFORMS)}")
    pattern = raw.get("answer_pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise RecipeError(f"{path}: field 'answer_pattern' is not a valid regular expression: {error}") from error
    check = raw.get("answer_check")
    if check is not None and check not in CHECKS:
        raise RecipeError(f"{path}: field 'answer_check' is {check!r}; allowed: {sorted(CHECKS)}")
    if check == "label" and pattern is None:
        raise RecipeError(f"{path}: field 'answer_check' label needs an 'answer_pattern'")
    if bool(raw.get("over_refusal_source")) != bool(raw.get("harmful_source")):
        raise RecipeError(f"{path}: fields 'over_refusal_source' and 'harmful_source' go together")
    return TaskCluster(**raw)


def _check_prompts(path: Path, raw: dict) -> dict:
    """A prompts cluster's fields: the file resolved beside the YAML, the prompt used as it is."""
    prompts = raw["prompts"]
    if not isinstance(prompts, str) or not prompts.strip():
        raise RecipeError(f"{path}: field 'prompts' must be a file path or hf:owner/name")
    for key in ("prompts_split", "prompt_column", "kind_column", "task_column", "split_column"):
        if key in raw and (not isinstance(raw[key], str) or not raw[key].strip()):
            raise RecipeError(f"{path}: field {key!r} must be a non-empty string")
    if raw.get("over_refusal_source") or raw.get("attack_templates") or raw.get("held_out_templates"):
        raise RecipeError(
            f"{path}: field 'prompts' brings whole prompts; it does not go with sources or attack/held-out templates"
        )
    if raw["templates"] and raw["templates"] != ("{content}",):
        raise RecipeError(
            f"{path}: field 'templates': a 'prompts' cluster uses its prompts as written; leave templates out"
        )
    if not prompts.startswith("hf:"):
        prompts = str((path.parent / prompts).resolve())
    return {"prompts": prompts, "templates": raw["templates"] or ("{content}",)}


def _check_template(path: Path, key: str, row: int, template: object) -> None:
    if not isinstance(template, str):
        raise RecipeError(f"{path}: field {key!r}, row {row}: expected a string")
    if template.count("{content}") != 1:
        raise RecipeError(f"{path}: field {key!r}, row {row}: needs exactly one {{content}} slot")
    try:
        template.format(content="x")
    except (KeyError, IndexError, ValueError) as error:
        raise RecipeError(
            f"{path}: field {key!r}, row {row}: stray braces ({error}); write {{{{ }}}} for literal ones"
        ) from error


def load_tasks(paths: list[str | Path]) -> list[TaskCluster]:
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RecipeError(f"task names must be unique; repeated: {sorted(duplicates)}")
    return tasks
