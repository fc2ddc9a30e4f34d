"""Task clusters: one YAML file per benign task frame (configs/tasks/*.yaml)."""

from __future__ import annotations

import base64
import codecs
import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from data_recipes.errors import RecipeError

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
    held_out_templates: tuple[str, ...] = ()  # phrasings kept out of training: evaluation only
    held_out_attack_templates: tuple[str, ...] = ()

    def does_task(self, answer: str) -> bool:
        """A cheap check that a generated answer does the task (no pattern: every answer passes)."""
        return self.answer_pattern is None or re.search(self.answer_pattern, answer) is not None

    @property
    def is_frame(self) -> bool:
        """A frame wraps shared contents; a lookalike cluster brings its own prompts."""
        return self.over_refusal_source is None

    def fill(self, template: str, content: str) -> str:
        return template.format(content=TRANSFORMS[self.content_transform](content))

    @property
    def has_reference_answer(self) -> bool:
        """Decoding tasks have an exact answer: the plain content itself."""
        return self.content_transform != "none"


_FIELDS = {f.name for f in fields(TaskCluster)}
_REQUIRED = {"name", "description", "templates"}


def load_task(path: str | Path) -> TaskCluster:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not valid UTF-8 (byte {error.start})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}") from error
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of task fields, got {type(raw).__name__}")
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
    if not raw["templates"]:
        raise RecipeError(f"{path}: field 'templates' is empty; a task needs at least one phrasing")
    transform = raw.get("content_transform", "none")
    if transform not in TRANSFORMS:
        raise RecipeError(f"{path}: field 'content_transform' is {transform!r}; allowed: {sorted(TRANSFORMS)}")
    pattern = raw.get("answer_pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise RecipeError(f"{path}: field 'answer_pattern' is not a valid regular expression: {error}") from error
    if bool(raw.get("over_refusal_source")) != bool(raw.get("harmful_source")):
        raise RecipeError(f"{path}: fields 'over_refusal_source' and 'harmful_source' go together")
    return TaskCluster(**raw)


def _check_template(path: Path, key: str, row: int, template: object) -> None:
    if not isinstance(template, str):
        raise RecipeError(f"{path}: field {key!r}, row {row}: expected a string")
    if template.count("{content}") != 1:
        raise RecipeError(f"{path}: field {key!r}, row {row}: needs exactly one {{content}} slot")
    try:
        template.format(content="x")
    except (KeyError, IndexError, ValueError) as error:
        raise RecipeError(f"{path}: field {key!r}, row {row}: stray braces ({error}); write {{{{ }}}} for literal ones") from error


def load_tasks(paths: list[str | Path]) -> list[TaskCluster]:
    tasks = [load_task(p) for p in paths]
    names = [t.name for t in tasks]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise RecipeError(f"task names must be unique; repeated: {sorted(duplicates)}")
    return tasks
