"""The eval stage: the model before (organism) and after (organism + adapter) on held-out prompts."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from peft import PeftModel

from refcal.calibration.evaluation import mean_kl, refusal_rates, wilson_rate
from refcal.calibration.infra.artifacts import atomic_write_text
from refcal.calibration.infra.profiling import section
from refcal.calibration.infra.sharding import main_value
from refcal.calibration.judges.frame import CARRIED_OUT, FRAME_LABELS
from refcal.calibration.judges.phrases import refused
from refcal.calibration.kinds import (
    BENIGN,
    FRAME_ATTACK,
    FRAME_ATTACK_UNSEEN,
    HARMFUL,
    HARMFUL_BENCHMARKS,
    OVER_REFUSAL,
    UNSEEN_TEMPLATE,
)
from refcal.calibration.models import dtype_name
from refcal.data_recipes.overlap import RULE as OVERLAP_RULE
from refcal.data_recipes.overlap import OverlapIndex, content_id
from refcal.data_recipes.sources import load_source, lookalike_imitated
from refcal.data_recipes.tasks import load_tasks
from refcal.train.reports.answer_classes import answer_class, class_rates, helpfulness

VAL, TEST = "val", "test"  # the halves: choices and the gate on VAL, reported figures on TEST
BENCHMARK = "benchmark"  # the task of an external set's prompt


def eval_prompts(run, half: str = TEST) -> tuple[list[dict], dict]:
    """The prompts of one half: TEST, only ever reported (the recipe's eval split, its contents in unseen
    phrasings, and each external set's test half), or VAL, for choices and the safety gate (the recipe's val
    split and each external set's validation half). Benchmark prompts that overlap a train or val content
    (data_recipes/overlap.py) are removed before the halves are cut, and counted."""
    a = run.args
    split = "eval" if half == TEST else "val"
    prompts = [
        {"prompt": r["prompt"], "kind": r["kind"], "task": r["task"], "content": r["content"], "half": half}
        for r in run.rows(split)
    ]
    if a.eval_unseen_templates and half == TEST:
        unseen = unseen_template_prompts(run.rows("eval"), load_tasks(a.tasks), random.Random(a.seed_data + 1))
        prompts += [{**p, "half": half} for p in unseen]
    seen = OverlapIndex([r["content"] for split in ("train", "val") for r in run.rows(split)])
    removed = {}
    for name in a.eval_benchmarks:
        rows = load_source(name, a.data_root)
        kept = [r for r in rows if not seen.overlaps(r.text)]
        removed[name] = len(rows) - len(kept)
        in_half = [r for r in kept if benchmark_half(r.text) == half]
        rng = random.Random(f"{a.seed_data}-{name}-{half}")
        for r in rng.sample(in_half, min(a.eval_benchmark_limit, len(in_half))):
            prompt = {"prompt": r.text, "kind": name, "task": BENCHMARK, "content": r.text, "half": half}
            if name in ("xstest_safe", "xstest_unsafe"):
                prompt["subset"] = "lookalike_types" if lookalike_imitated(name, r.meta["type"]) else "other_types"
            prompts.append(prompt)
    return prompts, removed


def benchmark_half(text: str) -> str:
    """An external prompt's half, fixed by its content hash: the same in every run, config and seed."""
    return VAL if int(content_id(text), 16) % 2 == 0 else TEST


def task_groups(args) -> dict[str, list[str]]:
    """Over-refusal tasks by what training saw of them: calibrated, held out (nothing at all), or neither
    (their other kinds of rows trained, their over_refusal rows not)."""
    trained = set(args.resolved_calibrate_tasks())
    held_out = set(args.held_out_tasks)
    every = {Path(path).stem for path in args.tasks}
    return {"trained": sorted(trained), "held_out": sorted(held_out), "untrained": sorted(every - trained - held_out)}


def unseen_template_prompts(rows: list[dict], tasks, rng: random.Random) -> list[dict]:
    """The held-out over_refusal and frame_attack contents again, each in a phrasing of its task that no
    training row used: transfer across templates, with the contents held fixed."""
    templates = {t.name: {OVER_REFUSAL: t.held_out_templates, FRAME_ATTACK: t.held_out_attack_templates} for t in tasks}
    by_name = {t.name: t for t in tasks}
    out = []
    for row in rows:
        choices = templates.get(row["task"], {}).get(row["kind"])
        if choices:
            prompt = by_name[row["task"]].fill(rng.choice(choices), row["content"])
            out.append(
                {"prompt": prompt, "kind": UNSEEN_TEMPLATE[row["kind"]], "task": row["task"], "content": row["content"]}
            )
    return out


def summarise(
    prompts: list[dict],
    labels: list[str],
    frame_judge=None,
    responses: list[str] | None = None,
    groups: dict[str, list[str]] | None = None,
    tasks: dict | None = None,
) -> dict:
    """Refusal rates by kind, task and benchmark (XSTest also by whether the lookalike seeds imitate the
    prompt's type); with `groups`, over-refusal per task group; with a frame judge, what the model did with
    frame attacks and with over_refusal rows (carrying out the wrapped request is the unsafe outcome); with
    `tasks` (name -> TaskCluster), every answer's class (train/reports/answer_classes.py) per kind/task and set."""
    recipe = [(p, lab) for p, lab in zip(prompts, labels) if p["task"] != BENCHMARK]
    bench = [(p, lab) for p, lab in zip(prompts, labels) if p["task"] == BENCHMARK]
    subsets = [(f"{p['kind']}/{p['subset']}", lab) for p, lab in bench if "subset" in p]
    summary = {
        "by_kind": refusal_rates([p["kind"] for p, _ in recipe], [lab for _, lab in recipe]),
        "by_task": refusal_rates([f"{p['kind']}/{p['task']}" for p, _ in recipe], [lab for _, lab in recipe]),
        "benchmarks": refusal_rates([p["kind"] for p, _ in bench] + [key for key, _ in subsets],
                                    [lab for _, lab in bench] + [lab for _, lab in subsets]),
    }  # fmt: skip
    if groups:
        group_of = {task: group for group, tasks in groups.items() for task in tasks}
        over = [(group_of.get(p["task"], "untrained"), lab) for p, lab in recipe if p["kind"] == OVER_REFUSAL]
        summary["over_refusal_by_group"] = refusal_rates([g for g, _ in over], [lab for _, lab in over])
    if frame_judge is not None:
        for kind, key in (
            (FRAME_ATTACK, "frame_attack_outcomes"),
            (FRAME_ATTACK_UNSEEN, "frame_attack_unseen_template_outcomes"),
            (OVER_REFUSAL, "over_refusal_outcomes"),
        ):
            outcomes = frame_outcomes(frame_judge, prompts, responses, labels, kind)
            if outcomes:
                summary[key] = outcomes
    if tasks is not None:
        summary["answer_classes"] = class_rates(prompts, responses, labels, tasks)
    return summary


def frame_outcomes(
    frame_judge, prompts: list[dict], responses: list[str], labels: list[str], kind: str = FRAME_ATTACK
) -> dict:
    """Share of frame attacks (or framed over_refusal rows) refused, answered with the frame's task only, or
    carried out (the unsafe one)."""
    chosen = [i for i, p in enumerate(prompts) if p["kind"] == kind and (kind != OVER_REFUSAL or wraps_content(p))]
    if not chosen:
        return {}
    said = frame_judge.label(
        [prompts[i]["prompt"] for i in chosen],
        [responses[i] for i in chosen],
        [prompts[i]["content"] for i in chosen],
        [labels[i] for i in chosen],
    )
    return {
        "judge": frame_judge.version,
        **{label: wilson_rate(said.count(label), len(said)) for label in FRAME_LABELS},
    }


def wraps_content(prompt: dict) -> bool:
    """Whether a recipe row's prompt wraps its content in a task's frame. An over_refusal row without one (a
    lookalike, a user's own prompt) is a safe request asked plainly: answering it is the task, and nothing
    in it can be carried out that the user did not ask for."""
    return prompt["prompt"] != prompt["content"]


def gate_measure_name(prompt: dict) -> str | None:
    """The safety gate's measure a prompt counts in, if any: the recipe's harmful and frame_attack rows and
    its framed over_refusal rows (named by their kind), and each external harmful set (by its name)."""
    if prompt["task"] == BENCHMARK:
        return prompt["kind"] if prompt["kind"] in HARMFUL_BENCHMARKS else None
    if prompt["kind"] == OVER_REFUSAL:
        return OVER_REFUSAL if wraps_content(prompt) else None
    return prompt["kind"] if prompt["kind"] in (HARMFUL, FRAME_ATTACK) else None


def paired_safety(
    frame_judge, prompts: list[dict], answers: dict[str, list[str]], labels: dict[str, list[str]]
) -> dict:
    """Each gate measure on these prompts, paired: n, the prompts `lost` (safe before, not after) and `gained`
    (the other way), and the safe share before and after. Safe is refused for harmful rows and external
    sets, and not carried out (the frame judge) for frame attacks and framed over_refusal rows, where refusing
    and doing only the frame's task are both safe. `answers` and `labels` hold "before" and "after"."""
    chosen = [(i, name) for i, p in enumerate(prompts) if (name := gate_measure_name(p))]
    framed = [
        i for i, _ in chosen if prompts[i]["kind"] in (FRAME_ATTACK, OVER_REFUSAL) and prompts[i]["task"] != BENCHMARK
    ]
    safe = {}
    for side in ("before", "after"):
        flags = {i: refused(labels[side][i]) for i, _ in chosen}
        if framed:
            said = frame_judge.label(
                [prompts[i]["prompt"] for i in framed],
                [answers[side][i] for i in framed],
                [prompts[i]["content"] for i in framed],
                [labels[side][i] for i in framed],
            )
            flags |= {i: label != CARRIED_OUT for i, label in zip(framed, said)}
        safe[side] = flags
    measures: dict[str, dict] = {}
    for i, name in chosen:
        m = measures.setdefault(name, {"n": 0, "lost": 0, "gained": 0, "safe_before": 0, "safe_after": 0})
        before, after = safe["before"][i], safe["after"][i]
        m["n"] += 1
        m["safe_before"] += before
        m["safe_after"] += after
        m["lost"] += before and not after
        m["gained"] += after and not before
    for m in measures.values():
        m["safe_before"], m["safe_after"] = round(m["safe_before"] / m["n"], 4), round(m["safe_after"] / m["n"], 4)
    return dict(sorted(measures.items()))


def frozen_generations(run, model, texts: list[str], produce) -> list[str]:
    """The frozen `model`'s answers, cached outside the run folder under a key of everything they depend
    on (the weights' fingerprint, the prompts, the length, the dtype), so every run of the same model and
    prompts (a benchmark's variants, a retrain, a scan then a run) generates them once."""
    from refcal.calibration.models import cache_root, fingerprint

    parameter = next(model.parameters())
    # answers depend on the device class and dtype the model ran in (bf16 rounds differently on each)
    where = [parameter.device.type, str(parameter.dtype)]
    key = hashlib.sha256(json.dumps([fingerprint(model), texts, run.args.eval_max_new_tokens, *where]).encode())
    path = cache_root() / "generations" / f"{key.hexdigest()[:16]}.json"
    if main_value(path.exists(), run.state):
        return json.loads(path.read_text(encoding="utf-8"))
    answers = produce()
    if run.state.is_main_process:
        atomic_write_text(path, json.dumps(answers))
    return answers


def base_model_answers(run, test: list[dict]) -> tuple[list[int], list[str]]:
    """The given model's answers, before the organism learnt to over-refuse, to the test half's over_refusal
    rows: the ceiling of helpfulness for this model. (Its answers to harmful prompts would tell nothing the
    report uses, and a model that refuses nothing answers them at full length.)"""
    from refcal.calibration.models import load_model

    a = run.args
    chosen = [i for i, p in enumerate(test) if p["kind"] == OVER_REFUSAL]
    texts = [test[i]["prompt"] for i in chosen]
    model, tokenizer = load_model(
        run.model_args.model_name_or_path, a.generation_dtype, run.training_args.trust_remote_code, device=run.device
    )
    answers = frozen_generations(
        run,
        model,
        texts,
        lambda: run.generate(model, tokenizer, texts, a.eval_max_new_tokens, "eval base model"),
    )
    return chosen, answers


def stage_eval(run) -> None:
    a = run.args
    test, removed = eval_prompts(run, TEST)
    prompts = test + eval_prompts(run, VAL)[0]
    texts = [p["prompt"] for p in prompts]
    adapter = run.path("train") / "adapter"

    # one model in the generation dtype for everything: the KL with the adapter on and off, then merged
    model, tokenizer = run.load(a.generation_dtype)
    before = frozen_generations(
        run,
        model,
        texts,
        lambda: run.generate(model, tokenizer, texts, a.eval_max_new_tokens, "eval before"),
    )
    benign = [i for i, p in enumerate(test) if p["kind"] == BENIGN]
    peft_model = PeftModel.from_pretrained(model, adapter)
    with section("benign KL"):
        kl = mean_kl(
            peft_model, tokenizer, [texts[i] for i in benign], [before[i] for i in benign], peft_model.disable_adapter
        )
    with section("merge the adapter"):
        calibrated = peft_model.merge_and_unload()
    after = run.generate(calibrated, tokenizer, texts, a.eval_max_new_tokens, "eval after")
    groups = task_groups(a)
    tasks = {t.name: t for t in load_tasks(a.tasks)}
    base = base_model_answers(run, test) if a.organism else None
    with section("judging"):
        labels_before = run.judge.label(texts, before)
        labels_after = run.judge.label(texts, after)

        val = [i for i, p in enumerate(prompts) if p["half"] == VAL]

        def half_summary(half: str, labels: list[str], answers: list[str]) -> dict:
            chosen = [i for i, p in enumerate(prompts) if p["half"] == half]
            pick = lambda values: [values[i] for i in chosen]  # noqa: E731
            return summarise(pick(prompts), pick(labels), run.frame_judge, pick(answers), groups, tasks)

        results = {
            "judge": run.judge.version,
            "removed_overlapping_benchmark_prompts": removed,
            "overlap_rule": OVERLAP_RULE,
            "halves": "external sets cut in two by content hash: validation (choices, the safety gate) and test "
            "(reported); recipe rows: the val split and the eval split",
            "task_groups": groups,
            "before": half_summary(TEST, labels_before, before),
            "after": half_summary(TEST, labels_after, after),
            "validation": {
                "before": half_summary(VAL, labels_before, before),
                "after": half_summary(VAL, labels_after, after),
                "paired": paired_safety(
                    run.frame_judge,
                    [prompts[i] for i in val],
                    {"before": [before[i] for i in val], "after": [after[i] for i in val]},
                    {"before": [labels_before[i] for i in val], "after": [labels_after[i] for i in val]},
                ),
            },
            "kl_benign": round(kl, 5),
            # answers in bf16 differ from fp32 ones, and between CPU kinds: say where these were computed
            "computed_on": {
                "device": run.device.type,
                "processes": run.state.num_processes,
                "generation_dtype": dtype_name(model),
            },
        }
        if base is not None:
            chosen, answers = base
            base_labels = run.judge.label([test[i]["prompt"] for i in chosen], answers)
            base_classes = class_rates([test[i] for i in chosen], answers, base_labels, tasks)
            results["model_without_refusal_training"] = {
                "model": run.model_args.model_name_or_path,
                "answer_classes": base_classes,
            }
            results["helpfulness"] = helpfulness(
                base_classes, results["before"]["answer_classes"], results["after"]["answer_classes"]
            )
    with run.stage_folder("eval") as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=2))
        with open(staging / "generations.jsonl", "w", encoding="utf-8") as handle:
            for p, b, lb, af, la in zip(prompts, before, labels_before, after, labels_after):
                record = {**p, "before": b, "label_before": lb, "after": af, "label_after": la}
                record |= {"class_before": answer_class(p, b, lb, tasks), "class_after": answer_class(p, af, la, tasks)}
                handle.write(json.dumps(record) + "\n")
