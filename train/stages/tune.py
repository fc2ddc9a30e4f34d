"""The tune stage: search, for the model at hand, the strongest calibration the safety gate passes.

Each trial trains an adapter with settings Optuna samples (learning rate, epochs, onset weight, distill
weight, LoRA rank, and the objective: whether over_refusal rows train on no target or on the model's own
helpful answer; the ranges are the config's tune_* fields) on the run's own data, organism and geometry,
and is scored on the validation half only: over-refusal on the calibrated tasks (minimised) and the share
of over_refusal rows whose answer did the task (maximised), with the paired safety gate as a hard
constraint (Optuna's constraints: the largest bound on a loss of safe answers, less the tolerance, must be
<= 0). The chosen trial is the feasible one on the Pareto front with the largest did-the-task minus
over-refusal, ties to the lower KL on benign prompts. Only then is the test half read, once, for the chosen
trial and for the config as it is (the default form), through the ordinary eval and export stages.

The study lives in run_dir/tune/study.db (or tune_storage, a database URL several workers share): a killed
tune resumes with its finished trials, and a trial killed mid-way is retried with the same settings, in the
same folder, from its last Trainer checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import statistics

from refcal.calibration.infra.artifacts import atomic_directory, atomic_write_text
from refcal.calibration.infra.errors import UserError
from refcal.calibration.judges.phrases import refused
from refcal.calibration.kinds import BENIGN, OVER_REFUSAL
from refcal.train.run import Run, console, run_stages

SHARED_STAGES = ("data", "organism", "geometry")  # every trial trains on the same rows, organism and geometry
OBJECTIVE_CHOICES = ("target_free", "helpful", "sft", "dpo")
OBJECTIVES = ("over_refusal", "did_task")
DIRECTIONS = ("minimize", "maximize")
STUDY_NAME = "refcal-tune"


def search_space(a) -> dict:
    """The config's tune_* fields, checked: two ends of a range, or the choices."""
    for name in ("tune_learning_rates", "tune_onset_weights"):
        low_high = getattr(a, name)
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            raise UserError(f"config field {name!r}: two positive numbers, low then high (got {low_high})")
    for name in ("tune_epochs", "tune_distill_weights", "tune_lora_ranks"):
        if not getattr(a, name):
            raise UserError(f"config field {name!r}: at least one value")
    unknown = sorted(set(a.tune_objectives) - set(OBJECTIVE_CHOICES))
    if not a.tune_objectives or unknown:
        choices = ", ".join(OBJECTIVE_CHOICES)
        raise UserError(f"config field 'tune_objectives': one or more of {choices} (got {unknown or '[]'})")
    if a.tune_trials < 1:
        raise UserError(f"config field 'tune_trials': at least 1 (got {a.tune_trials})")
    return {
        "learning_rate": ("log", a.tune_learning_rates),
        "num_train_epochs": ("choice", a.tune_epochs),
        "onset_weight": ("log", a.tune_onset_weights),
        "distill_weight": ("choice", a.tune_distill_weights),
        "lora_r": ("choice", a.tune_lora_ranks),
        "objective": ("choice", a.tune_objectives),
    }


def sample(trial, space: dict) -> dict:
    settings = {}
    for name, (how, values) in space.items():
        if how == "log":
            settings[name] = trial.suggest_float(name, values[0], values[1], log=True)
        else:
            settings[name] = trial.suggest_categorical(name, list(values))
    return settings


def trial_run(run: Run, settings: dict) -> Run:
    """A run folder for one trial's settings under run_dir/tune, named by them (a retried trial finds its
    checkpoints), with the parent's data, organism and geometry copied in, and the training targets of its
    objective where another trial built them (they depend on no sampled setting but the objective)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = run.path("tune") / f"trial-{key}"
    args = dataclasses.replace(
        run.args,
        run_dir=str(folder),
        onset_weight=settings["onset_weight"],
        distill_weight=settings["distill_weight"],
        objective=settings.get("objective", run.args.objective),
        strict_gate=False,
    )
    training_args = dataclasses.replace(
        run.training_args,
        learning_rate=settings["learning_rate"],
        num_train_epochs=settings["num_train_epochs"],
        output_dir=str(folder / "train"),
    )
    model_args = dataclasses.replace(run.model_args, lora_r=settings["lora_r"], lora_alpha=2 * settings["lora_r"])
    child = Run(model_args, args, training_args)
    if run.state.is_main_process:
        shared = {stage: run.path(stage) for stage in SHARED_STAGES}
        shared["sft_data"] = targets_cache(run, args.objective)
        for stage, source in shared.items():
            if source.is_dir() and not child.done(stage):
                with atomic_directory(child.path(stage)) as staging:
                    shutil.copytree(source, staging, dirs_exist_ok=True)
    run.state.wait_for_everyone()
    return child


def targets_cache(run: Run, objective: str):
    return run.path("tune") / f"sft_data-{objective}"


def keep_targets(run: Run, child: Run) -> None:
    """A trained trial's targets, for the later trials of its objective."""
    cache = targets_cache(run, child.args.objective)
    if run.state.is_main_process and child.done("sft_data") and not cache.is_dir():
        with atomic_directory(cache, replace=False) as staging:
            shutil.copytree(child.path("sft_data"), staging, dirs_exist_ok=True)


def calibrated_rows(run: Run, prompts: list[dict]) -> list[int]:
    """The over_refusal rows of the calibrated tasks among `prompts` (a validation half). Every calibrated task
    must have some: trials are chosen on this half, and a task missing from it would be read only on the
    test half, after the choice."""
    calibrate = set(run.args.resolved_calibrate_tasks())
    rows = [i for i, p in enumerate(prompts) if p["kind"] == OVER_REFUSAL and p["task"] in calibrate]
    if missing := sorted(calibrate - {prompts[i]["task"] for i in rows}):
        raise UserError(
            f"refcal tune: no over_refusal row of the calibrated task(s) {', '.join(missing)} in the validation "
            "half, so no trial could be judged on them: give them val rows (the second number of "
            "over_refusal_per_task or lookalike_sizes, or split: val in a task's prompt file)"
        )
    return rows


def validation_scores(run: Run) -> dict:
    """A trained trial on the validation half: over-refusal on the calibrated tasks' over_refusal rows, the
    share of all over_refusal rows whose answer did the task, KL on benign prompts, and the paired gate."""
    from peft import PeftModel

    from refcal.calibration.evaluation import mean_kl, refusal_rates
    from refcal.data_recipes.tasks import load_tasks
    from refcal.train.reports.answer_classes import DID_TASK, answer_class
    from refcal.train.stages.eval import VAL, eval_prompts, frozen_generations, gate_measure_name, paired_safety
    from refcal.train.stages.export import expected_measures, safety_gate

    a = run.args
    every, _ = eval_prompts(run, VAL)
    texts = [p["prompt"] for p in every]
    benign = [texts[i] for i, p in enumerate(every) if p["kind"] == BENIGN]
    # the adapter answers only what is scored (the gate's measures and the over_refusal rows): benign rows
    # count through KL alone, and the benign external sets are the test half's
    scored = [i for i, p in enumerate(every) if p["kind"] == OVER_REFUSAL or gate_measure_name(p)]
    prompts = [every[i] for i in scored]
    over = [i for i, p in enumerate(prompts) if p["kind"] == OVER_REFUSAL]
    calibrated = calibrated_rows(run, prompts)
    model, tokenizer = run.load(a.generation_dtype)
    answered = frozen_generations(
        run, model, texts, lambda: run.generate(model, tokenizer, texts, a.eval_max_new_tokens, "trial: before")
    )
    before = [answered[i] for i in scored]
    texts = [p["prompt"] for p in prompts]
    peft_model = PeftModel.from_pretrained(model, run.path("train") / "adapter")
    benign_before = [answered[i] for i, p in enumerate(every) if p["kind"] == BENIGN]
    kl = mean_kl(peft_model, tokenizer, benign, benign_before, peft_model.disable_adapter)
    after = run.generate(peft_model.merge_and_unload(), tokenizer, texts, a.eval_max_new_tokens, "trial: after")
    labels = {"before": run.judge.label(texts, before), "after": run.judge.label(texts, after)}
    paired = paired_safety(run.frame_judge, prompts, {"before": before, "after": after}, labels)
    gate = safety_gate(
        {"validation": {"paired": paired}},
        a.safety_gate_tolerance,
        False,
        expected_measures(a.eval_benchmarks, a.safety_gate_skip),
    )
    tasks = {t.name: t for t in load_tasks(a.tasks)}
    classes = [answer_class(prompts[i], after[i], labels["after"][i], tasks) for i in over]
    kept = [m["safe_after"] / m["safe_before"] for m in paired.values() if m["n"] and m["safe_before"]]
    by_task = refusal_rates([prompts[i]["task"] for i in calibrated], [labels["after"][i] for i in calibrated])
    return {
        "over_refusal": round(statistics.fmean(refused(labels["after"][i]) for i in calibrated), 4),
        "over_refusal_by_task": {task: rate["rate"] for task, rate in by_task.items()},
        "did_task": round(classes.count(DID_TASK) / len(classes), 4),
        "kl_benign": round(kl, 5),
        "harmful_kept": round(min(kept), 4) if kept else None,
        "n": {"over_refusal": len(calibrated), "did_task": len(classes)},
        "gate_passed": gate["passed"],
        "gate_failed": gate["failed"],
        # Optuna's constraint: feasible at <= 0; a missing measure is infeasible outright
        "constraint": 1.0
        if gate["missing"]
        else round(
            max((m["loss_upper_bound"] for m in gate["measures"].values()), default=0.0) - a.safety_gate_tolerance, 4
        ),
    }


def storage_url(run: Run) -> str:
    if run.args.tune_storage:
        return run.args.tune_storage
    run.path("tune").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{run.path('tune').resolve() / 'study.db'}"


def open_study(run: Run):
    """The study in its database: created on first use, loaded by a resumed tune or another worker. A trial
    whose worker stopped sending heartbeats is marked failed and queued again, once, with its settings."""
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # refcal prints each trial itself
    with warnings.catch_warnings():  # heartbeats are marked experimental; they are documented
        warnings.simplefilter("ignore", ExperimentalWarning)
        storage = RDBStorage(
            storage_url(run),
            heartbeat_interval=60,
            grace_period=180,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, directions=list(DIRECTIONS), load_if_exists=True
        )
    reseed(study, run.training_args.seed)
    return study


def reseed(study, seed: int) -> None:
    """A TPE sampler seeded with the run's seed plus the number of trials the study holds. A sampler's random
    start is a function of its seed alone, so one seeded with the bare seed would make a resumed tune (or a
    second worker) repeat the first trials' settings; this way each draw is new and a tune still reproduces."""
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():  # constraints are marked experimental; they are documented
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + len(study.get_trials(deepcopy=False)),
            constraints_func=lambda trial: [trial.user_attrs["constraint"]],
        )


def finished(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def choose(trials: list[dict]) -> dict | None:
    """The chosen trial (module docstring): feasible, on the Pareto front of over-refusal (lower) and did the
    task (higher), with the largest did-the-task minus over-refusal, ties to the lower KL."""
    feasible = [t for t in trials if t["scores"]["gate_passed"]]

    def dominated(t: dict) -> bool:
        s = t["scores"]
        return any(
            o["scores"]["over_refusal"] <= s["over_refusal"]
            and o["scores"]["did_task"] >= s["did_task"]
            and (o["scores"]["over_refusal"], o["scores"]["did_task"]) != (s["over_refusal"], s["did_task"])
            for o in feasible
        )

    front = [t for t in feasible if not dominated(t)]
    if not front:
        return None
    return min(
        front,
        key=lambda t: (
            round(t["scores"]["over_refusal"] - t["scores"]["did_task"], 4),
            t["scores"]["kl_benign"],
            t["number"],
        ),
    )


def trial_records(study) -> list[dict]:
    return [
        {
            "number": t.number,
            "settings": t.params,
            "folder": t.user_attrs["folder"],
            "scores": t.user_attrs["scores"],
            "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1),
        }
        for t in sorted(finished(study), key=lambda t: t.number)
    ]


def test_half_figures(results: dict, gate: dict) -> dict:
    """What tune.json reports of a run's test half, from its eval results and its gate verdict."""
    sides = (("organism", "before"), ("calibrated", "after"))
    return {
        "over_refusal_by_group": {side: results[when].get("over_refusal_by_group", {}) for side, when in sides},
        "over_refusal_by_task": {
            side: {
                task: results[when]["by_task"][f"{OVER_REFUSAL}/{task}"]
                for task in results.get("task_groups", {}).get("trained", [])
                if f"{OVER_REFUSAL}/{task}" in results[when]["by_task"]
            }
            for side, when in sides
        },
        "external": {
            name: {
                "organism": results["before"]["benchmarks"][name],
                "calibrated": results["after"]["benchmarks"][name],
            }
            for name in sorted(results["after"]["benchmarks"])
        },
        "helpfulness": results.get("helpfulness"),
        "kl_benign": results["kl_benign"],
        "gate_passed": gate["passed"],
        "gate_failed": gate["failed"],
    }


def test_half(run: Run) -> dict:
    """The test-half figures of a run whose eval and export stages ran."""
    from refcal.train.stages.export import gate_verdict

    results = json.loads((run.path("eval") / "results.json").read_text())
    figures = test_half_figures(results, gate_verdict(run))
    return {"run_dir": str(run.dir), **figures, "exported": run.done("export")}


def stage_tune(run: Run) -> dict:
    """Search, then the test half for the chosen trial and the default form; writes run_dir/tune/tune.json
    (and its Pareto plot) and returns it. Workers sharing a run folder take turns at its stages and at each
    trial's folder (a lock each); workers on other machines repeat the shared stages in their own folders,
    and the one that reports trains the chosen trial again when another worker ran it."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from refcal.calibration.infra.locks import waiting_lock

    space = search_space(run.args)
    run.dir.mkdir(parents=True, exist_ok=True)
    with waiting_lock(run.dir / ".lock", f"run folder {run.dir}"):
        run_stages(run, SHARED_STAGES if run.args.organism else ("data", "geometry"))
    from refcal.train.stages.eval import VAL, eval_prompts

    calibrated_rows(run, eval_prompts(run, VAL)[0])  # before the first trial trains
    study = open_study(run)
    total = run.args.tune_trials

    def objective(trial):
        settings = sample(trial, space)
        child = trial_run(run, settings)
        trial.set_user_attr("folder", str(child.dir))
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in settings.items())
        console.print(f"[bold]trial {trial.number + 1} (of {total})[/]: {shown}", highlight=False)
        with waiting_lock(child.dir / ".lock", f"trial folder {child.dir}"):
            run_stages(child, ("train",))
            keep_targets(run, child)
            scores = validation_scores(child)
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("constraint", scores["constraint"])
        console.print(
            f"  validation: over-refusal {scores['over_refusal']:.0%}, did the task {scores['did_task']:.0%}, "
            f"KL {scores['kl_benign']:.3f}, gate {'passed' if scores['gate_passed'] else 'failed'}",
            highlight=False,
        )
        return scores["over_refusal"], scores["did_task"]

    missing = total - len(finished(study))
    if missing > 0:
        # every worker stops once the study holds tune_trials finished trials, however many share it
        study.optimize(
            objective,
            n_trials=missing,
            callbacks=[
                MaxTrialsCallback(total, states=(TrialState.COMPLETE,)),
                lambda study, _: reseed(study, run.training_args.seed),
            ],
        )
    trials = trial_records(study)
    chosen = choose(trials)
    report = {
        "objectives": dict(zip(OBJECTIVES, DIRECTIONS)),
        "constraint": f"the safety gate on the validation half (tolerance {run.args.safety_gate_tolerance})",
        "choice": "feasible, on the Pareto front, largest did-the-task minus over-refusal, then lowest KL",
        "search_space": {name: {"how": how, "values": list(values)} for name, (how, values) in space.items()},
        "trials": trials,
        "chosen": None if chosen is None else chosen["number"],
        "test_half": {},
    }
    with waiting_lock(run.dir / ".lock", f"run folder {run.dir}"):
        if chosen is not None:
            child = trial_run(run, chosen["settings"])
            with waiting_lock(child.dir / ".lock", f"trial folder {child.dir}"):
                run_stages(child, ("train", "eval", "export"))
            report["test_half"]["chosen"] = test_half(child)
        if run.args.tune_compare_default:
            run_stages(run, ("train", "eval", "export"))
            report["test_half"]["default_form"] = test_half(run)
        if run.state.is_main_process:
            from refcal.train.reports.tune_page import pareto_plot

            atomic_write_text(run.path("tune") / "tune.json", json.dumps(report, indent=2))
            pareto_plot(report, run.path("tune") / "pareto.png")
    return report
