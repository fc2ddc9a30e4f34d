"""The geometry stage: the frozen model's own responses (judged), its last-token activations, the
refusal direction and per-task subspaces, and the chosen layer, saved under run_dir/geometry; and the
geometry report read back from that folder (`refcal geometry --report DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from refcal.calibration.activations import NonFiniteActivations
from refcal.calibration.generation import generate_with_activations
from refcal.calibration.geometry.directions import Geometry, estimate
from refcal.calibration.geometry.layer_choice import choose_layer, refusal_tokens
from refcal.calibration.infra.artifacts import atomic_save_tensors
from refcal.calibration.infra.profiling import section
from refcal.calibration.judges.phrases import refused
from refcal.calibration.kinds import BENIGN, HARMFUL
from refcal.calibration.models import fingerprint


def stage_geometry(run) -> None:
    a = run.args
    rows = run.rows("train")
    val = run.rows("val")
    # One model for the whole stage, in the generation dtype: the activations come from the generation's own
    # prefill, and the layer choice's forward passes cost half as much in bf16 as in float32.
    model, tokenizer = run.load(a.generation_dtype, qlora=a.geometry_in_4bit)
    model_fp = fingerprint(model)
    prompts = [r["prompt"] for r in rows]
    try:
        responses, activations = generate_with_activations(
            model,
            tokenizer,
            prompts,
            a.target_max_new_tokens,
            run.batch_size(model),
            desc="own responses",
            processes=run.state,
        )
    except NonFiniteActivations as error:
        tasks = sorted({f"{rows[i]['kind']}/{rows[i]['task']}" for i in error.rows})
        raise NonFiniteActivations(
            f"{error} in rows of {tasks}, e.g. {rows[error.rows[0]]['id']}", error.rows, error.layers
        ) from error
    with section("judging"):
        labels = run.judge.label(prompts, responses)
    geometry = estimate(
        activations,
        [r["kind"] for r in rows],
        [r["task"] for r in rows],
        [refused(lab) for lab in labels],
        model_fp,
        a.subspace_max_rank,
        a.subspace_variance,
    )
    num_layers = activations.shape[1]
    candidates = a.layer_candidates or list(range(int(0.2 * num_layers), int(0.8 * num_layers) + 1))
    tokens = refusal_tokens(
        tokenizer, [r for r, lab, row in zip(responses, labels, rows) if refused(lab) and row["kind"] == HARMFUL]
    )
    with section("layer choice"):
        layer, table = choose_layer(
            model,
            tokenizer,
            geometry,
            [r["prompt"] for r in val if r["kind"] == HARMFUL],
            [r["prompt"] for r in val if r["kind"] == BENIGN],
            tokens,
            candidates,
            a.layer_kl_max,
            run.batch_size(model),
            processes=run.state,
        )
    geometry.layer = layer
    geometry.info.update(
        {
            "layer_scores": table,
            "refusal_tokens": tokenizer.convert_ids_to_tokens(tokens),
            "weights": run.weights_description(a.geometry_in_4bit),
        }
    )
    with run.stage_folder("geometry") as staging:
        geometry.save(staging)
        atomic_save_tensors({"last_token": activations.contiguous()}, staging / "activations.safetensors")
        with open(staging / "responses.jsonl", "w", encoding="utf-8") as handle:
            for row, response, label in zip(rows, responses, labels):
                handle.write(json.dumps({"id": row["id"], "response": response, "label": label}) + "\n")


def geometry_report(run, directory: str) -> Path:
    """The paper's measurements on this run's frozen model (organism or base), from the geometry stage's
    cached activations and judged responses; probes at every third layer and the chosen one."""
    from refcal.train.reports.geometry_page import (  # scikit-learn: only when a report is asked for
        analyse,
        write_report,
    )

    geometry = Geometry.load(run.path("geometry"))
    activations = load_file(run.path("geometry") / "activations.safetensors")["last_token"].float().numpy()
    _, labels = load_responses(run)
    rows = run.rows("train")
    num_layers = activations.shape[1]
    probe_layers = sorted({*range(0, num_layers, 3), geometry.layer})
    analysis = analyse(
        activations,
        [r["kind"] for r in rows],
        [r["task"] for r in rows],
        [refused(labels[r["id"]]) for r in rows],
        probe_layers,
        run.args.report_permutations,
        run.training_args.seed,
    )
    model = run.model_args.model_name_or_path
    if run.args.organism:
        model = f"the organism built on {model} (cache key {json.loads((run.path('organism') / 'organism.json').read_text())['key']})"
    return write_report(analysis, geometry.layer, directory, model)


def load_responses(run) -> tuple[dict[str, str], dict[str, str]]:
    """The geometry stage's judged own responses: ({row id: response}, {row id: label})."""
    records = [json.loads(line) for line in (run.path("geometry") / "responses.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in records}, {r["id"]: r["label"] for r in records}
