"""The eval stage: the model before (organism) and after (organism + adapter) on held-out prompts."""

from __future__ import annotations

import hashlib
import json
import random

from peft import PeftModel

from refcal.calibration.artifacts import atomic_directory, atomic_write_text
from refcal.calibration.evaluation import mean_kl, refusal_rates, wilson_rate
from refcal.calibration.frame_judge import FRAME_LABELS
from refcal.calibration.generation import generate
from refcal.calibration.kinds import BENIGN, FRAME_ATTACK, FRAME_ATTACK_UNSEEN, OVER_REFUSAL, UNSEEN_TEMPLATE
from refcal.calibration.profiling import section
from refcal.data_recipes.overlap import RULE as OVERLAP_RULE
from refcal.data_recipes.overlap import OverlapIndex
from refcal.data_recipes.sources import load_source
from refcal.data_recipes.tasks import load_tasks


def eval_prompts(run) -> tuple[list[dict], dict]:
    """Held-out recipe rows plus benchmark prompts; benchmark prompts that overlap a train or val content
    (data_recipes/overlap.py) are removed before sampling, and counted."""
    a = run.args
    prompts = [
        {"prompt": r["prompt"], "kind": r["kind"], "task": r["task"], "content": r["content"]} for r in run.rows("eval")
    ]
    if a.eval_unseen_templates:
        prompts += unseen_template_prompts(run.rows("eval"), load_tasks(a.tasks), random.Random(a.seed_data + 1))
    seen = OverlapIndex([r["content"] for split in ("train", "val") for r in run.rows(split)])
    removed = {}
    rng = random.Random(a.seed_data)
    for name in a.eval_benchmarks:
        rows = load_source(name, a.data_root)
        kept = [r for r in rows if not seen.overlaps(r.text)]
        removed[name] = len(rows) - len(kept)
        for r in rng.sample(kept, min(a.eval_benchmark_limit, len(kept))):
            prompts.append({"prompt": r.text, "kind": name, "task": "benchmark", "content": r.text})
    return prompts, removed


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


def summarise(prompts: list[dict], labels: list[str], frame_judge=None, responses: list[str] | None = None) -> dict:
    """Refusal rates by kind, task and benchmark; with a frame judge, what the model did with frame attacks."""
    recipe = [(p, lab) for p, lab in zip(prompts, labels) if p["task"] != "benchmark"]
    bench = [(p, lab) for p, lab in zip(prompts, labels) if p["task"] == "benchmark"]
    summary = {
        "by_kind": refusal_rates([p["kind"] for p, _ in recipe], [lab for _, lab in recipe]),
        "by_task": refusal_rates([f"{p['kind']}/{p['task']}" for p, _ in recipe], [lab for _, lab in recipe]),
        "benchmarks": refusal_rates([p["kind"] for p, _ in bench], [lab for _, lab in bench]),
    }
    if frame_judge is not None:
        summary["frame_attack_outcomes"] = frame_outcomes(frame_judge, prompts, responses, labels)
        unseen = frame_outcomes(frame_judge, prompts, responses, labels, FRAME_ATTACK_UNSEEN)
        if unseen:
            summary["frame_attack_unseen_template_outcomes"] = unseen
    return summary


def frame_outcomes(
    frame_judge, prompts: list[dict], responses: list[str], labels: list[str], kind: str = FRAME_ATTACK
) -> dict:
    """Share of frame attacks refused, answered with the frame's task only, or carried out (the unsafe one)."""
    chosen = [i for i, p in enumerate(prompts) if p["kind"] == kind]
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


def frozen_generations(run, model, texts: list[str], produce) -> list[str]:
    """The frozen `model`'s answers, cached outside the run folder under a key of everything they depend
    on (the weights' fingerprint, the prompts, the length, the dtype), so every run of the same model and
    prompts (a benchmark's variants, a retrain, a scan then a run) generates them once."""
    from refcal.calibration.models import cache_root, fingerprint

    dtype = str(next(model.parameters()).dtype)
    key = hashlib.sha256(json.dumps([fingerprint(model), texts, run.args.eval_max_new_tokens, dtype]).encode())
    path = cache_root() / "generations" / f"{key.hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    answers = produce()
    atomic_write_text(path, json.dumps(answers))
    return answers


def stage_eval(run) -> None:
    a = run.args
    prompts, removed = eval_prompts(run)
    texts = [p["prompt"] for p in prompts]
    adapter = run.path("train") / "adapter"

    # one model in the generation dtype for everything: the KL with the adapter on and off, then merged
    model, tokenizer = run.load(a.generation_dtype)
    before = frozen_generations(
        run,
        model,
        texts,
        lambda: generate(model, tokenizer, texts, a.eval_max_new_tokens, a.generation_batch_size, desc="eval before"),
    )
    benign = [i for i, p in enumerate(prompts) if p["kind"] == BENIGN]
    peft_model = PeftModel.from_pretrained(model, adapter)
    with section("benign KL"):
        kl = mean_kl(
            peft_model, tokenizer, [texts[i] for i in benign], [before[i] for i in benign], peft_model.disable_adapter
        )
    with section("merge the adapter"):
        calibrated = peft_model.merge_and_unload()
    after = generate(calibrated, tokenizer, texts, a.eval_max_new_tokens, a.generation_batch_size, desc="eval after")
    with section("judging"):
        labels_before = run.judge.label(texts, before)
        labels_after = run.judge.label(texts, after)
        before_summary = summarise(prompts, labels_before, run.frame_judge, before)
        after_summary = summarise(prompts, labels_after, run.frame_judge, after)
    results = {
        "judge": run.judge.version,
        "removed_overlapping_benchmark_prompts": removed,
        "overlap_rule": OVERLAP_RULE,
        "before": before_summary,
        "after": after_summary,
        "kl_benign": round(kl, 5),
    }
    with atomic_directory(run.path("eval")) as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=2))
        with open(staging / "generations.jsonl", "w", encoding="utf-8") as handle:
            for p, b, lb, af, la in zip(prompts, before, labels_before, after, labels_after):
                handle.write(json.dumps({**p, "before": b, "label_before": lb, "after": af, "label_after": la}) + "\n")
