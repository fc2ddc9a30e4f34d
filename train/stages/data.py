"""The data stage: the config's contrastive recipe rows, checked and saved under run_dir/data."""

from __future__ import annotations

import json

from refcal.calibration.infra.artifacts import atomic_directory
from refcal.calibration.models import load_tokenizer
from refcal.data_recipes.build import RecipeSizes, build_recipe, check_disjoint, manifest, to_dataset_dict
from refcal.data_recipes.row_checks import check_calibrated_tasks, check_held_out_tasks, fit_prompt_lengths
from refcal.data_recipes.tasks import load_tasks
from refcal.train.config import ConfigError, RefcalArguments


def recipe_rows(a: RefcalArguments) -> tuple[list[dict], list, RecipeSizes]:
    """The config's contrastive rows (deterministic in its seed), its task clusters and sizes."""
    rows, tasks, sizes, _ = recipe(a)
    return rows, tasks, sizes


def recipe(a: RefcalArguments) -> tuple[list[dict], list, RecipeSizes, dict[str, int]]:
    """recipe_rows, plus the number of contents per split dropped as near copies of an earlier split's."""
    tasks = load_tasks(a.tasks)
    check_held_out_tasks(a, [t.name for t in tasks])
    sizes = RecipeSizes(
        tuple(a.harmful_sizes),
        tuple(a.benign_sizes),
        tuple(a.over_refusal_per_task),
        tuple(a.benign_per_task),
        tuple(a.attack_per_task),
        tuple(a.lookalike_sizes),
    )
    rows, dropped = build_recipe(tasks, sizes, a.seed_data, a.data_root, tuple(a.held_out_tasks))
    check_disjoint(rows)
    return rows, tasks, sizes, dropped


def stage_data(run) -> None:
    a = run.args
    rows, tasks, sizes, dropped = recipe(a)
    try:  # the prompt-length check needs the model's chat template
        tokenizer = load_tokenizer(run.model_args.model_name_or_path, run.training_args.trust_remote_code)
    except OSError as error:
        raise ConfigError(
            f"model_name_or_path {run.model_args.model_name_or_path!r}: cannot load its tokenizer ({error})"
        ) from error
    rows, too_long = fit_prompt_lengths(rows, tokenizer, run.training_args.max_length, a.target_max_new_tokens)
    check_calibrated_tasks(rows, a.resolved_calibrate_tasks(), a.tasks)
    with atomic_directory(run.path("data")) as staging:
        to_dataset_dict(rows).save_to_disk(str(staging / "recipe"))
        (staging / "manifest.json").write_text(
            json.dumps(
                manifest(rows, tasks, sizes, a.seed_data, a.data_root, a.held_out_tasks, dropped, too_long), indent=2
            )
        )
