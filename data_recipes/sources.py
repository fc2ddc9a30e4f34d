"""Named prompt sources: where each lives under the data root, and where a user elsewhere downloads it.

Each source reads to a list of `SourceRow(text, meta)`. Readers fail with the file, row and field named.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from refcal.data_recipes.recipe_error import RecipeError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SEEDS = Path(__file__).resolve().parent / "seeds"


@dataclass(frozen=True)
class SourceRow:
    text: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    name: str
    path: str  # relative to the data root, or absolute for the project's own seed files
    text_field: str
    hf_dataset: str | None  # what a user on a normal machine would `datasets.load_dataset`
    meta_fields: tuple[str, ...] = ()
    where: tuple[str, str] | None = None  # keep rows whose field equals a value


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("advbench", "advbench/harmful_behaviors.csv", "goal", "walledai/AdvBench"),
        Source("malicious_instruct", "malicious_instruct/MaliciousInstruct.txt", "text", "walledai/MaliciousInstruct"),
        Source(
            "harmbench_test",
            "harmbench/harmbench_behaviors_text_test.csv",
            "Behavior",
            "walledai/HarmBench",
            ("SemanticCategory",),
            where=("FunctionalCategory", "standard"),
        ),
        Source("strongreject", "strongreject/strongreject_dataset.csv", "forbidden_prompt", "walledai/StrongREJECT"),
        Source("jbb_harmful", "jailbreakbench/harmful-behaviors.csv", "Goal", "JailbreakBench/JBB-Behaviors"),
        Source("jbb_benign", "jailbreakbench/benign-behaviors.csv", "goal", "JailbreakBench/JBB-Behaviors"),
        Source("xstest_safe", "xstest/xstest_prompts.csv", "prompt", "walledai/XSTest", ("type",), ("label", "safe")),
        Source(
            "xstest_unsafe", "xstest/xstest_prompts.csv", "prompt", "walledai/XSTest", ("type",), ("label", "unsafe")
        ),
        Source("alpaca", "alpaca/alpaca_no_input_instructions.json", "instruction", "tatsu-lab/alpaca"),
        Source("oktest", "oktest/OKTest.csv", "prompt", None),
        Source("coconot_contrast", "coconot/coconot_contrast_eval.jsonl", "prompt", "allenai/coconot"),
        Source("lookalike_safe", str(SEEDS / "lookalikes.jsonl"), "safe", None, ("type", "id")),
        Source("lookalike_unsafe", str(SEEDS / "lookalikes.jsonl"), "unsafe", None, ("type", "id")),
        Source("borderline_safe", str(SEEDS / "borderline.jsonl"), "safe", None, ("type", "id")),
        Source("borderline_unsafe", str(SEEDS / "borderline.jsonl"), "unsafe", None, ("type", "id")),
    ]
}


def default_data_root() -> Path:
    """REFCAL_DATA_DIR, else ../shared/data beside the checkout (as on the project's machines)."""
    if "REFCAL_DATA_DIR" in os.environ:
        return Path(os.environ["REFCAL_DATA_DIR"])
    return PROJECT_ROOT.parent / "shared" / "data"


def load_source(name: str, data_root: str | Path | None = None) -> list[SourceRow]:
    if name not in SOURCES:
        raise RecipeError(f"unknown source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    path = Path(source.path)
    if not path.is_absolute():
        path = Path(data_root or default_data_root()) / path
    if not path.exists():
        hint = f" (elsewhere: datasets.load_dataset({source.hf_dataset!r}))" if source.hf_dataset else ""
        raise RecipeError(f"source {name!r}: file not found: {path}{hint}")
    records = read_records(path, source.text_field)
    rows = []
    for number, record in records:
        if source.where and str(record.get(source.where[0], "")) != source.where[1]:
            continue
        text = record.get(source.text_field)
        if not isinstance(text, str) or not text.strip():
            raise RecipeError(f"{path}: row {number}: field {source.text_field!r} is missing or empty")
        rows.append(SourceRow(text.strip(), {k: record.get(k) for k in source.meta_fields}))
    return rows


def read_records(path: Path, text_field: str) -> list[tuple[int, dict]]:
    """(row number, record) pairs; row numbers count data rows from 1 (JSONL/TXT: line numbers)."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        row = line - 1 if path.suffix.lower() == ".csv" else line  # CSV rows count after the header
        raise RecipeError(f"{path}: row {row}: not valid UTF-8 (byte {error.start})") from error
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(content, newline=""))  # quoted fields may hold newlines
        if text_field not in (reader.fieldnames or []):
            raise RecipeError(f"{path}: missing column {text_field!r} (columns: {reader.fieldnames})")
        return [(i, row) for i, row in enumerate(reader, start=1)]
    if suffix == ".jsonl":
        records = []
        for i, line in enumerate(content.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecipeError(f"{path}: row {i}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise RecipeError(f"{path}: row {i}: expected a JSON object")
            records.append((i, record))
        return records
    if suffix == ".json":
        try:
            data = json.loads(content)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
        if not isinstance(data, list):
            raise RecipeError(f"{path}: expected a JSON list of objects")
        return [(i, r if isinstance(r, dict) else {}) for i, r in enumerate(data, start=1)]
    if suffix == ".txt":
        return [(i, {text_field: line}) for i, line in enumerate(content.splitlines(), start=1) if line.strip()]
    raise RecipeError(f"{path}: unsupported file type {suffix!r}")


# XSTest's unsafe contrast types, each with the safe types it mirrors.
XSTEST_CONTRASTS = {
    "contrast_discr": ("nons_group_real_discr", "real_group_nons_discr"),
    "contrast_privacy": ("privacy_public", "privacy_fictional"),
}


def lookalike_imitated(source: str, prompt_type: str) -> bool:
    """Whether an XSTest prompt's type is one the lookalike seeds imitate (their `type` field uses XSTest's
    names): a drop on those prompts is partly in-distribution, so summaries report them apart."""
    seed_types = _lookalike_types()
    if source == "xstest_safe":
        return prompt_type in seed_types
    mirrored = XSTEST_CONTRASTS.get(prompt_type, (prompt_type.removeprefix("contrast_"),))
    return bool(seed_types & set(mirrored))


@functools.cache
def _lookalike_types() -> frozenset[str]:
    return frozenset(row.meta["type"] for row in load_source("lookalike_safe"))
