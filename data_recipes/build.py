"""Contrastive rows from task clusters: harmful, over_refusal, benign and frame_attack, split by content.

The same harmful sentence appears raw (harmful), inside a benign frame (over_refusal) and inside an
attack frame (frame_attack), so the only thing that separates those rows is the task. Contents are
assigned to one split each (train, val, eval), so no split shares a content with another; a content that
is a near copy of an earlier split's (data_recipes/overlap.py) leaves the later split. Held-out tasks keep
only their eval rows: nothing of theirs is trained on, or used for directions or choices.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from refcal.calibration.kinds import BENIGN, FRAME_ATTACK, HARMFUL, KINDS, OVER_REFUSAL  # noqa: F401 (KINDS: re-exported)
from refcal.data_recipes.overlap import RULE as NEAR_COPY_RULE
from refcal.data_recipes.overlap import OverlapIndex, content_id, normalise  # noqa: F401 (normalise: re-exported)
from refcal.data_recipes.recipe_error import RecipeError
from refcal.data_recipes.sources import SOURCES, SourceRow, default_data_root, load_source
from refcal.data_recipes.tasks import SPLITS, TaskCluster
from refcal.data_recipes.user_prompts import load_prompt_rows

RAW_TASK = "none"  # the task of unframed harmful and benign rows

HARMFUL_POOL = ("advbench", "malicious_instruct")
BENIGN_POOL = ("alpaca",)
# Evaluation benchmarks: their prompts never enter any split's contents.
EVAL_SOURCES = ("jbb_harmful", "jbb_benign", "harmbench_test", "strongreject", "xstest_safe", "xstest_unsafe")


@dataclass(frozen=True)
class RecipeSizes:
    """How many contents each split gets, per kind; framed kinds are per task."""

    harmful: tuple[int, int, int] = (120, 100, 60)
    benign: tuple[int, int, int] = (60, 32, 30)
    over_refusal_per_task: tuple[int, int, int] = (16, 12, 12)
    benign_per_task: tuple[int, int, int] = (8, 0, 6)
    attack_per_task: tuple[int, int, int] = (6, 12, 6)
    lookalike: tuple[int, int, int] = (40, 0, 30)


def _pool(names: tuple[str, ...], data_root, banned: set[str]) -> list[SourceRow]:
    seen, rows = set(banned), []
    for name in names:
        for row in load_source(name, data_root):
            key = content_id(row.text)
            if key not in seen:
                seen.add(key)
                rows.append(SourceRow(row.text, {**row.meta, "source": name}))
    return rows


def _split_contents(rows: list[SourceRow], counts: tuple[int, int, int], rng: random.Random, what: str):
    need = sum(counts)
    if len(rows) < need:
        raise RecipeError(
            f"{what}: {len(rows)} contents available, {need} needed for splits {dict(zip(SPLITS, counts))}"
        )
    rows = rows[:]
    rng.shuffle(rows)
    out, start = {}, 0
    for split, n in zip(SPLITS, counts):
        out[split] = rows[start : start + n]
        start += n
    return out


def build_rows(
    tasks: list[TaskCluster], sizes: RecipeSizes, seed: int, data_root=None, held_out_tasks: tuple[str, ...] = ()
) -> list[dict]:
    return build_recipe(tasks, sizes, seed, data_root, held_out_tasks)[0]


def build_recipe(
    tasks: list[TaskCluster], sizes: RecipeSizes, seed: int, data_root=None, held_out_tasks: tuple[str, ...] = ()
) -> tuple[list[dict], dict[str, int]]:
    """Every split's rows, and the number of contents per split dropped as near copies of an earlier
    split's. The rows of `held_out_tasks` are built like the others (so the other tasks' rows do not depend
    on which are held out) and then kept in eval only."""
    rng = random.Random(seed)
    banned = {content_id(r.text) for name in EVAL_SOURCES for r in load_source(name, data_root)}
    harmful = _split_contents(_pool(HARMFUL_POOL, data_root, banned), sizes.harmful, rng, "harmful pool")
    benign = _split_contents(_pool(BENIGN_POOL, data_root, banned), sizes.benign, rng, "benign pool")
    rows: list[dict] = []

    def add(split, kind, task, prompt, content: SourceRow, reference=""):
        rows.append(
            dict(
                prompt=prompt,
                kind=kind,
                task=task,
                split=split,
                source=content.meta.get("source", ""),
                content=content.text,
                content_id=content_id(content.text),
                reference=reference,
            )
        )

    for split in SPLITS:
        for content in harmful[split]:
            add(split, HARMFUL, RAW_TASK, content.text, content)
        for content in benign[split]:
            add(split, BENIGN, RAW_TASK, content.text, content)

    for task in tasks:
        if task.prompts is not None:
            _add_user_prompts(task, sizes, rng, banned, add)
        elif task.is_frame:
            _add_framed(task, harmful, benign, sizes, rng, add)
        else:
            _add_lookalikes(task, sizes, rng, data_root, banned, add)

    for i, row in enumerate(rows):
        row["id"] = f"{row['split']}-{row['kind']}-{row['task']}-{i:05d}"
    rows = [r for r in rows if r["split"] == "eval" or r["task"] not in held_out_tasks]
    return drop_near_copies(rows)


def drop_near_copies(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Rows whose content is a near copy of an earlier split's content (train before val before eval) are
    dropped, with every other row of that content in the split; returns the rows kept and the number of
    contents dropped per split."""
    index, kept, dropped = OverlapIndex(), [], {}
    for split in SPLITS:
        rows_of_split = [r for r in rows if r["split"] == split]
        contents = {r["content_id"]: r["content"] for r in rows_of_split}
        copies = {key for key, text in contents.items() if index.overlaps(text)}
        dropped[split] = len(copies)
        kept += [r for r in rows_of_split if r["content_id"] not in copies]
        for key, text in contents.items():
            if key not in copies:
                index.add(text)
    return kept, dropped


def _add_framed(task: TaskCluster, harmful, benign, sizes: RecipeSizes, rng: random.Random, add) -> None:
    """Frame contents of each split; rotate through the split's contents so tasks share them."""
    for index, split in enumerate(SPLITS):
        for kind, pool, count, templates in (
            (OVER_REFUSAL, harmful[split], sizes.over_refusal_per_task[index], task.templates),
            (BENIGN, benign[split], sizes.benign_per_task[index], task.templates),
            (FRAME_ATTACK, harmful[split], sizes.attack_per_task[index], task.attack_templates),
        ):
            if count == 0 or not templates:
                continue
            if count > len(pool):
                raise RecipeError(f"task {task.name!r}: {count} {kind} rows asked from {len(pool)} {split} contents")
            for content in rng.sample(pool, count):
                template = rng.choice(templates)
                reference = content.text if kind == OVER_REFUSAL and task.has_reference_answer else ""
                add(split, kind, task.name, task.fill(template, content.text), content, reference)


def _add_lookalikes(task: TaskCluster, sizes: RecipeSizes, rng, data_root, banned, add) -> None:
    """Safe lookalikes and their harmful twins stay together in one split."""
    safe = load_source(task.over_refusal_source, data_root)
    unsafe = load_source(task.harmful_source, data_root)
    if len(safe) != len(unsafe):
        raise RecipeError(f"task {task.name!r}: {len(safe)} safe rows but {len(unsafe)} harmful twins")
    pairs = [(s, u) for s, u in zip(safe, unsafe) if content_id(s.text) not in banned]
    need = sum(sizes.lookalike)
    if len(pairs) < need:
        raise RecipeError(f"task {task.name!r}: {len(pairs)} lookalike pairs, {need} needed")
    rng.shuffle(pairs)
    train, val, test = sizes.lookalike
    # val comes from the far end, so a config's train and eval rows are the same whatever its val size
    cuts = {"train": pairs[:train], "eval": pairs[train : train + test], "val": pairs[train + test : need]}
    for split in SPLITS:
        for s, u in cuts[split]:
            meta = {"source": task.over_refusal_source}
            add(split, OVER_REFUSAL, task.name, task.fill(task.templates[0], s.text), SourceRow(s.text, meta))
            meta = {"source": task.harmful_source}
            add(split, HARMFUL, task.name, task.fill(task.templates[0], u.text), SourceRow(u.text, meta))


def _add_user_prompts(task: TaskCluster, sizes: RecipeSizes, rng: random.Random, banned, add) -> None:
    """A user's prompts as they are: rows with a split keep it; the others are cut, per kind, in the
    proportions the config's per-task sizes give (over_refusal and harmful: over_refusal_per_task)."""
    ratios = {
        OVER_REFUSAL: sizes.over_refusal_per_task, HARMFUL: sizes.over_refusal_per_task,
        BENIGN: sizes.benign_per_task, FRAME_ATTACK: sizes.attack_per_task,
    }  # fmt: skip
    seen: set[str] = set()
    unplaced: dict[str, list] = {}
    for row in load_prompt_rows(task):
        key = content_id(row.text)
        if key in banned or key in seen:  # an evaluation benchmark's prompt, or a repeat
            continue
        seen.add(key)
        if row.split:
            _add_prompt_row(task, row.split, row, add)
        else:
            unplaced.setdefault(row.kind, []).append(row)
    for kind, rows in unplaced.items():
        ratio = ratios[kind]
        if sum(ratio) == 0:
            raise RecipeError(
                f"{rows[0].origin}: {len(rows)} {kind} rows of task {task.name!r} have no split, and the config's sizes give {kind} none"
            )
        rng.shuffle(rows)
        cuts = [round(len(rows) * sum(ratio[: i + 1]) / sum(ratio)) for i in range(len(SPLITS))]
        for split, start, stop in zip(SPLITS, [0, *cuts[:-1]], cuts):
            for row in rows[start:stop]:
                _add_prompt_row(task, split, row, add)


def _add_prompt_row(task: TaskCluster, split: str, row, add) -> None:
    add(split, row.kind, task.name, row.text, SourceRow(row.text, {"source": f"{row.origin}#{row.row}"}))


def check_disjoint(rows: list[dict]) -> None:
    """No content may appear in two splits (lookalike twins count as one content via their split)."""
    owner: dict[str, str] = {}
    for row in rows:
        previous = owner.setdefault(row["content_id"], row["split"])
        if previous != row["split"]:
            raise RecipeError(f"content {row['content'][:60]!r} is in both {previous} and {row['split']}")


def to_dataset_dict(rows: list[dict]) -> DatasetDict:
    return DatasetDict({s: Dataset.from_list([r for r in rows if r["split"] == s]) for s in SPLITS})


def manifest(
    rows: list[dict],
    tasks: list[TaskCluster],
    sizes: RecipeSizes,
    seed: int,
    data_root=None,
    held_out_tasks: tuple[str, ...] = (),
    near_copies_dropped: dict[str, int] | None = None,
    too_long_dropped: int = 0,
) -> dict:
    counts = Counter((r["split"], r["kind"], r["task"]) for r in rows)
    by_split = {
        s: {
            "rows": sum(v for (sp, _, _), v in counts.items() if sp == s),
            "by_kind": dict(Counter(r["kind"] for r in rows if r["split"] == s)),
            "by_task": dict(Counter(f"{r['kind']}/{r['task']}" for r in rows if r["split"] == s)),
            "content_hash": _hash(sorted({r["content_id"] for r in rows if r["split"] == s})),
        }
        for s in SPLITS
    }
    used = sorted({r["source"].split("#")[0] for r in rows} | set(EVAL_SOURCES))  # a user row: "file#row"
    return {
        "seed": seed,
        "sizes": sizes.__dict__,
        "tasks": [t.name for t in tasks],
        "held_out_tasks": list(held_out_tasks),
        "near_copy_rule": NEAR_COPY_RULE,
        "near_copy_contents_dropped": near_copies_dropped,
        "too_long_rows_dropped": too_long_dropped,  # recipe rows whose prompt leaves no room for the answer
        "splits": by_split,
        "rows_hash": _hash([(r["id"], r["prompt"], r["kind"], r["task"]) for r in rows]),
        "sources": {name: _describe_source(name, data_root) for name in used if name},
    }


def _describe_source(name: str, data_root) -> dict:
    if name.startswith("hf:"):
        return {"hf_dataset": name[3:]}
    if name not in SOURCES:  # a user's prompts file
        return {"file": name, "sha256": hashlib.sha256(Path(name).read_bytes()).hexdigest()}
    source = SOURCES[name]
    path = Path(source.path)
    if not path.is_absolute():
        path = Path(data_root or default_data_root()) / path
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "hf_dataset": source.hf_dataset}


def _hash(items) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]
