"""The baselines stage: each inference-time intervention on the frozen model (organism or base), with the
eval stage's prompts, judge and measures, beside refcal's adapter when the eval stage has run.

Writes run_dir/baselines/results.json (per method: refusal by kind, task and benchmark, KL on benign
prompts, selectivity, routing for task steering) and generations.jsonl.
"""

from __future__ import annotations

import json
import time
from collections import Counter

from safetensors.torch import load_file

from refcal.calibration.evaluation import kl_sums, selectivity
from refcal.calibration.geometry.directions import Geometry
from refcal.calibration.geometry.steering import build_baselines
from refcal.calibration.judges.phrases import refused
from refcal.calibration.kinds import BENIGN, FRAME_ATTACK, HARMFUL, OVER_REFUSAL
from refcal.train.stages.eval import eval_prompts, summarise
from refcal.train.stages.geometry import load_responses


def calibrated_rates(prompts: list[dict], labels: list[str], calibrate: set[str]) -> dict[str, float]:
    """Refusal rates that selectivity compares: over-refusal on the calibrated tasks, raw harmful, frames."""

    def rate(keep) -> float:
        chosen = [refused(lab) for p, lab in zip(prompts, labels) if keep(p)]
        return sum(chosen) / max(len(chosen), 1)

    return {
        "over_refusal_calibrated": rate(lambda p: p["kind"] == OVER_REFUSAL and p["task"] in calibrate),
        HARMFUL: rate(lambda p: p["kind"] == HARMFUL),
        FRAME_ATTACK: rate(lambda p: p["kind"] == FRAME_ATTACK),
    }


def method_result(
    prompts, labels, before_rates, calibrate, settings, kl, frame_judge=None, responses=None, seconds=None
) -> dict:
    rates = calibrated_rates(prompts, labels, calibrate)
    return {
        "settings": settings,
        "rates": {k: round(v, 4) for k, v in rates.items()},
        "selectivity": selectivity(
            before_rates["over_refusal_calibrated"],
            rates["over_refusal_calibrated"],
            before_rates["harmful"],
            rates["harmful"],
        ),
        "kl_benign": None if kl is None else round(kl, 5),
        "seconds": seconds,
        **summarise(prompts, labels, frame_judge, responses),
    }


def organism_generations(run, prompts: list[dict], texts: list[str]) -> tuple[list[str], list[str] | None]:
    """The frozen model's answers (from the eval stage when it ran on these prompts) and refcal's, if any."""
    path = run.path("eval") / "generations.jsonl"
    if path.exists():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if [r["prompt"] for r in records] == texts:
            return [r["before"] for r in records], [r["after"] for r in records]
    a = run.args
    model, tokenizer = run.load(a.generation_dtype)
    return run.generate(model, tokenizer, texts, a.eval_max_new_tokens, "eval before"), None


def stage_baselines(run) -> None:
    a = run.args
    calibrate = set(a.resolved_calibrate_tasks())
    geometry = Geometry.load(run.path("geometry"))
    activations = load_file(run.path("geometry") / "activations.safetensors")["last_token"].float()
    _, labels_by_id = load_responses(run)
    rows = run.rows("train")
    started = time.time()
    baselines = build_baselines(
        activations,
        [r["kind"] for r in rows],
        [r["task"] for r in rows],
        [refused(labels_by_id[r["id"]]) for r in rows],
        geometry,
        sorted(calibrate),
        list(a.orthogonalisation_coefficients),
        list(a.steering_layers or [geometry.layer]),
        geometry.layer if a.steering_route_layer is None else a.steering_route_layer,
        a.steering_scale,
    )
    build_seconds = round(time.time() - started, 2)

    prompts, removed = eval_prompts(run)
    texts = [p["prompt"] for p in prompts]
    before, refcal_after = organism_generations(run, prompts, texts)
    labels_before = run.judge.label(texts, before)
    before_rates = calibrated_rates(prompts, labels_before, calibrate)
    benign = {i for i, p in enumerate(prompts) if p["kind"] == BENIGN}

    results = {
        "judge": run.judge.version,
        "removed_overlapping_benchmark_prompts": removed,
        "layer": geometry.layer,
        "seconds_building_all_baselines": build_seconds,
        "methods": {
            "organism": method_result(
                prompts, labels_before, before_rates, calibrate, {}, None, run.frame_judge, before
            )
        },
    }
    if refcal_after is not None:
        refcal = json.loads((run.path("eval") / "results.json").read_text())
        results["methods"]["refcal"] = method_result(
            prompts,
            run.judge.label(texts, refcal_after),
            before_rates,
            calibrate,
            {"adapter": str(run.path("train") / "adapter")},
            refcal["kl_benign"],
            run.frame_judge,
            refcal_after,
        )
    answers = {"organism": before, **({"refcal": refcal_after} if refcal_after else {})}

    gen_model, tokenizer = run.load(a.generation_dtype)
    kl_model, _ = run.load("float32")
    run.geometry_for(kl_model)  # the interventions steer with this geometry: it must be this model's
    for baseline in baselines:
        # route with the float32 model, so routing does not depend on the generation dtype
        started = time.time()
        groups = baseline.groups(kl_model, tokenizer, texts, run.batch_size(kl_model))
        responses = [""] * len(texts)
        total, count = 0.0, 0
        for group in groups:
            with group.context(gen_model):
                routed = [texts[i] for i in group.indices]
                out = run.generate(
                    gen_model, tokenizer, routed, a.eval_max_new_tokens, f"{baseline.name} {group.label}"
                )
            for i, response in zip(group.indices, out):
                responses[i] = response
            chosen = [i for i in group.indices if i in benign]
            if chosen:
                t, c = kl_sums(
                    kl_model,
                    tokenizer,
                    [texts[i] for i in chosen],
                    [before[i] for i in chosen],
                    current_mode=lambda: group.context(kl_model),
                )
                total, count = total + t, count + c
        seconds = round(time.time() - started, 1)  # routing, generation and KL on every eval prompt
        settings = dict(baseline.settings)
        if len(groups) > 1 or groups[0].label != "all":
            settings["routing"] = routing_table(prompts, groups)
        results["methods"][baseline.name] = method_result(
            prompts,
            run.judge.label(texts, responses),
            before_rates,
            calibrate,
            settings,
            total / max(count, 1),
            run.frame_judge,
            responses,
            seconds,
        )
        answers[baseline.name] = responses

    with run.stage_folder("baselines") as staging:
        (staging / "results.json").write_text(json.dumps(results, indent=2))
        with open(staging / "generations.jsonl", "w", encoding="utf-8") as handle:
            for i, p in enumerate(prompts):
                handle.write(json.dumps({**p, **{name: out[i] for name, out in answers.items()}}) + "\n")


def routing_table(prompts: list[dict], groups) -> dict[str, dict[str, int]]:
    """How many prompts of each eval task went to each route (the diagonal is routing accuracy)."""
    table: dict[str, Counter] = {}
    for group in groups:
        for i in group.indices:
            table.setdefault(prompts[i]["task"], Counter())[group.label] += 1
    return {task: dict(sorted(counts.items())) for task, counts in sorted(table.items())}


def markdown_table(results: dict) -> str:
    """One row per method: the rates selectivity rests on (over-refusal on the calibrated tasks, harmful),
    frame attacks, benign refusal, XSTest safe, KL, and the drops in points with their ratio."""
    lines = [
        "| method | over-refusal, calibrated tasks | harmful | frame attacks | benign | XSTest safe | KL benign "
        "| over-refusal drop | harmful drop | selectivity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        s, rates = m["selectivity"], m["rates"]
        kl = "" if m["kl_benign"] is None else f"{m['kl_benign']:.3f}"
        xstest = m["benchmarks"].get("xstest_safe")
        drops = (
            ("", "", "(reference)")
            if name == "organism"
            else (
                f"{100 * s['over_refusal_drop']:.0f} pts",
                f"{100 * s['harmful_drop']:.0f} pts",
                s.get("note", "") if s["selectivity"] is None else f"{s['selectivity']:.2f}",
            )
        )
        lines.append(
            f"| {name} | {rates['over_refusal_calibrated']:.0%} | {rates['harmful']:.0%} | {rates['frame_attack']:.0%} "
            f"| {m['by_kind'][BENIGN]['rate']:.0%} | {'' if xstest is None else format(xstest['rate'], '.0%')} | {kl} "
            f"| {' | '.join(drops)} |"
        )
    return "\n".join(lines)
