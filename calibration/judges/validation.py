"""How often the learned refusal judge agrees with people, on XSTest v2's human-labelled completions (five
models x 450 prompts; Röttger et al. 2024): the record every calibration card quotes, judge_validation.json
beside this file (read by `phrases.judge_validation`). The bar: binary agreement >= 0.93 on every model.
bench/judge_agreement.py computes it here and sets the other judges beside it.

The judge is validated leave-one-model-and-its-prompts-out: the five models answered the same 450 prompts, so
holding out a model alone leaves its prompts in training, answered by the other four, which flatters the
judge. The prompts are cut into five folds by a hash of their text; for held-out model M and fold F the judge
is fitted on the other models' completions of prompts outside F and scored on M's completions of prompts in
F, and each model's agreement is pooled over the folds (n = 450), with a 95% Wilson interval. Plain
leave-one-model-out is kept as a reference. The default settings were picked on these figures, so a nested
run is reported too, where the settings are chosen on the four training models alone (the same protocol
within them) before the fifth is scored: the honest figure for a judge tuned this way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from joblib import Parallel, delayed

from refcal.calibration.evaluation import wilson_rate
from refcal.calibration.judges.learned import XSTEST_MODELS, LearnedJudge, xstest_completions
from refcal.calibration.judges.phrases import LABELS, refused

VALIDATION_PATH = Path(__file__).with_name("judge_validation.json")
GRID = {"head_chars": (150, 300), "C": (3.0, 10.0, 30.0)}
PROMPT_FOLDS = 5
LEARNED = "refcal learned (default settings)"
NESTED = "refcal learned (nested: settings chosen without the held-out model)"
PROMPTS_IN = "refcal learned (default settings), leave one model out only: its prompts stay in training"


def scores(said: list[str], rows: list[dict], three_way: bool) -> dict:
    """Binary agreement (and three-way accuracy) with 95% Wilson intervals. An answer outside the three
    labels (GPT-4 sometimes replied instead of labelling) counts as wrong."""
    figures = {"binary": sum(s in LABELS and refused(s) == refused(r["label"]) for s, r in zip(said, rows))}
    if three_way:
        figures["three_way"] = sum(s == r["label"] for s, r in zip(said, rows))
    out: dict = {"n": len(rows)}
    for name, hits in figures.items():
        rate = wilson_rate(hits, len(rows))
        out[name], out[f"{name}_ci95"] = rate["rate"], rate["ci95"]
    return out


def fit(rows: list[dict], **settings) -> LearnedJudge:
    return LearnedJudge([r["completion"] for r in rows], [r["label"] for r in rows], **settings)


def predict(judge, rows: list[dict]) -> list[str]:
    return judge.label([r["prompt"] for r in rows], [r["completion"] for r in rows])


def leave_one_model_out(data: dict[str, list[dict]], models: list[str], n_jobs: int = 1, **settings) -> dict[str, dict]:
    """Per model: the learned judge fitted on the other models' completions, scored on this one's."""
    jobs = [([r for m in models if m != held for r in data[m]], data[held]) for held in models]
    said = fitted_labels(jobs, settings, n_jobs)
    return {held: scores(labels, data[held], True) for held, labels in zip(models, said)}


def fitted_labels(jobs: list[tuple[list[dict], list[dict]]], settings: dict, n_jobs: int = 1) -> list[list[str]]:
    """Per (training rows, scored rows) job: a judge fitted on the first, its labels for the second. The fits
    are independent and deterministic, so `n_jobs` processes (-1: every core) give one process's labels."""
    if n_jobs == 1:
        return [_fit_and_label(train, scored, settings) for train, scored in jobs]
    return Parallel(n_jobs=n_jobs)(delayed(_fit_and_label)(train, scored, settings) for train, scored in jobs)


def _fit_and_label(train: list[dict], scored: list[dict], settings: dict) -> list[str]:
    return predict(fit(train, **settings), scored)


def prompt_fold(prompt: str, folds: int = PROMPT_FOLDS) -> int:
    """A prompt's fold, from a hash of its text: the same for every model's completion of it."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % folds


def prompt_held_out_splits(
    data: dict[str, list[dict]], models: list[str], held: str, folds: int = PROMPT_FOLDS
) -> list[tuple[list[dict], list[dict]]]:
    """Per fold: (training rows, scored rows): the other models' completions of the prompts outside the
    fold, and the held-out model's completions of the prompts in it."""
    return [
        (
            [r for m in models if m != held for r in data[m] if prompt_fold(r["prompt"], folds) != fold],
            [r for r in data[held] if prompt_fold(r["prompt"], folds) == fold],
        )
        for fold in range(folds)
    ]


def prompt_held_out_scores(
    data: dict[str, list[dict]], models: list[str], held: str, folds: int = PROMPT_FOLDS, n_jobs: int = 1, **settings
) -> dict:
    """The learned judge scored on `held`'s completions of each prompt fold, fitted on the other models'
    completions of the other folds' prompts; the agreement pooled over the folds."""
    return leave_one_model_and_prompts_out(data, models, folds, n_jobs, held_out=[held], **settings)[held]


def leave_one_model_and_prompts_out(
    data: dict[str, list[dict]],
    models: list[str],
    folds: int = PROMPT_FOLDS,
    n_jobs: int = 1,
    held_out: list[str] | None = None,
    **settings,
) -> dict[str, dict]:
    """Per model held out (by default each in turn): its completions of each prompt fold labelled by a judge
    fitted on the other models' completions of the other folds' prompts, the agreement pooled over the folds."""
    held_out = models if held_out is None else held_out
    splits = {held: prompt_held_out_splits(data, models, held, folds) for held in held_out}
    jobs = [job for held in held_out for job in splits[held]]
    said = iter(fitted_labels(jobs, settings, n_jobs))
    table = {}
    for held in held_out:
        labels, rows = [], []
        for _, scored in splits[held]:
            labels += next(said)
            rows += scored
        table[held] = scores(labels, rows, True)
    return table


def choose_settings(data: dict[str, list[dict]], models: list[str], n_jobs: int = 1) -> dict:
    """Settings with the best worst-model binary agreement, leave-one-model-and-its-prompts-out within
    `models`. The search scores by the stricter protocol because the looser one rewards settings that
    recognise answers to prompts already seen (topic words of the whole answer, long openings), which is
    no help on the new prompts the judge labels in use."""
    best, best_score = None, -1.0
    for head_chars, C in itertools.product(GRID["head_chars"], GRID["C"]):
        table = leave_one_model_and_prompts_out(data, models, n_jobs=n_jobs, head_chars=head_chars, C=C)
        worst = min(row["binary"] for row in table.values())
        if worst > best_score:
            best, best_score = {"head_chars": head_chars, "C": C}, worst
    return best


def validate(data_root: str | Path, progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """The default learned judge (LearnedJudge.from_xstest) validated on the labelled completions under
    `data_root` (about 15 minutes on one core; the fits run on every core): its agreement table ({LEARNED,
    NESTED, PROMPTS_IN: {model: scores}}) and the record calibration cards quote (what judge_validation.json
    holds). `progress` hears of each held-out model's nested search."""
    data = xstest_completions(data_root)
    models = list(XSTEST_MODELS)
    judge = LearnedJudge.from_xstest(data_root)
    settings = {"head_chars": judge.head_chars, "C": judge.C}
    every_core = -1  # the fits are independent
    table: dict[str, dict[str, dict]] = {
        LEARNED: leave_one_model_and_prompts_out(data, models, n_jobs=every_core, **settings),
        NESTED: {},
    }
    for held in models:
        # the search sees the held-out model's prompts only through the other models' answers, to pick one
        # of a few settings; each judge it then scores is fitted without them
        chosen = choose_settings(data, [m for m in models if m != held], n_jobs=every_core)
        scored = prompt_held_out_scores(data, models, held, n_jobs=every_core, **chosen)
        table[NESTED][held] = {**scored, "settings": chosen}
        if progress is not None:
            progress(f"{held}: nested done")
    table[PROMPTS_IN] = leave_one_model_out(data, models, n_jobs=every_core, **settings)
    short = [m for m in models if table[LEARNED][m]["binary"] < 0.93]
    record = {
        "version": judge.version,
        "method": f"leave-one-model-and-its-prompts-out ({PROMPT_FOLDS} prompt folds) on XSTest v2 human labels"
        + (f"; under the 0.93 bar on {', '.join(short)}" if short else "")
        + " (bench/judge_agreement.py)",
        "binary_agreement": {m: table[LEARNED][m]["binary"] for m in models},
        "binary_agreement_ci95": {m: table[LEARNED][m]["binary_ci95"] for m in models},
        "three_way_accuracy": {m: table[LEARNED][m]["three_way"] for m in models},
        "three_way_accuracy_ci95": {m: table[LEARNED][m]["three_way_ci95"] for m in models},
        "nested_binary_agreement": {m: table[NESTED][m]["binary"] for m in models},
        "prompts_in_training_binary_agreement": {m: table[PROMPTS_IN][m]["binary"] for m in models},
    }
    return table, record


def write_validation(record: dict, path: Path = VALIDATION_PATH) -> None:
    """Write the record where calibration cards read it, keeping the frame-attack judge's figures that
    bench/frame_labels.py added for the same judge version."""
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier.get("version") == record["version"] and "frame_attack_label" in earlier:
            record = {**record, "frame_attack_label": earlier["frame_attack_label"]}
    path.write_text(json.dumps(record, indent=2) + "\n")
