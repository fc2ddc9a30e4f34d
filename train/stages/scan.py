"""`refcal scan`: where a model, as given, refuses too much and where it refuses too little.

The first command to run on one's own model. It generates the frozen model's answers to the eval
stage's prompts (the recipe's eval split plus the external benchmark sets, overlap-filtered as eval does)
and reports, per task cluster and kind, the refusal rate with its 95% Wilson interval; the clusters that
over-refuse beyond a threshold, as a `calibrate_tasks:` line for the config; and the harmful kinds and
sets whose refusal is already below a floor, which calibration must not make worse.

It uses the very prompts, generation settings and cache of the eval stage, so a later `refcal run` of
the same model in the same run folder reuses the scan's answers, and a scan after such a run reuses
eval's. No organism is built or used: scan looks at model_name_or_path even when the config sets
`organism: true` (an organism is a test bed, not the user's model).
"""

from __future__ import annotations

import copy
import dataclasses
import json

from rich import box
from rich.table import Table

from refcal.calibration.infra.artifacts import atomic_write_text
from refcal.calibration.kinds import (
    BENIGN,
    FRAME_ATTACK,
    FRAME_ATTACK_UNSEEN,
    HARMFUL,
    HARMFUL_BENCHMARKS,
    OVER_REFUSAL,
    OVER_REFUSAL_UNSEEN,
    SHOULD_REFUSE_EVAL,
)

SCAN = "scan"
HARMFUL_KINDS = SHOULD_REFUSE_EVAL
# External sets whose prompts should be refused; the others (xstest_safe, jbb_benign, oktest, ...) should be answered.
HARMFUL_SOURCES = frozenset(
    {*HARMFUL_BENCHMARKS, "advbench", "malicious_instruct", "lookalike_unsafe", "borderline_unsafe"}
)
KIND_ORDER = (OVER_REFUSAL, OVER_REFUSAL_UNSEEN, BENIGN, FRAME_ATTACK, FRAME_ATTACK_UNSEEN, HARMFUL)
RAW_TASK = "none"  # the task of the recipe's unframed harmful and benign rows


def as_given(run):
    """The run seen with organism off: model_reference and load() then name the configured model itself.
    The data stage does not depend on the organism, so the recipe and the run folder stay shared."""
    view = copy.copy(run)
    view.args = dataclasses.replace(run.args, organism=False)
    return view


def stage_scan(run) -> None:
    """Generate (or read from the eval cache), judge and summarise; write run_dir/scan atomically."""
    from refcal.calibration.models import dtype_name
    from refcal.data_recipes.overlap import RULE as OVERLAP_RULE
    from refcal.train.stages.eval import eval_prompts, frozen_generations, summarise

    model_run = as_given(run)
    a = model_run.args
    prompts, removed = eval_prompts(model_run)
    texts = [p["prompt"] for p in prompts]

    model, tokenizer = model_run.load(a.generation_dtype)
    responses = frozen_generations(
        model_run,
        model,
        texts,
        lambda: model_run.generate(model, tokenizer, texts, a.eval_max_new_tokens, "scan"),
    )
    labels = model_run.judge.label(texts, responses)
    summary = summarise(prompts, labels, model_run.frame_judge, responses)
    result = {
        "model": model_run.model_reference,
        "organism_in_config": bool(run.args.organism),
        "judge": model_run.judge.version,
        "prompts": prompts_description(prompts, a.eval_benchmark_limit),
        "eval_max_new_tokens": a.eval_max_new_tokens,
        "generation_dtype": dtype_name(model),
        "device": next(model.parameters()).device.type,
        "removed_overlapping_benchmark_prompts": removed,
        "overlap_rule": OVERLAP_RULE,
        "summary": summary,
        **findings(summary, a.scan_over_refusal_threshold, a.scan_harmful_floor),
    }
    with run.stage_folder(SCAN) as staging:
        (staging / "scan.json").write_text(json.dumps(result, indent=2))
        with open(staging / "generations.jsonl", "w", encoding="utf-8") as handle:
            for p, response, label in zip(prompts, responses, labels):
                handle.write(json.dumps({**p, "response": response, "label": label}) + "\n")


def prompts_description(prompts: list[dict], limit: int) -> str:
    recipe = sum(p["task"] != "benchmark" for p in prompts)
    sets = sorted({p["kind"] for p in prompts if p["task"] == "benchmark"})
    return (
        f"the eval stage's: the recipe's eval split ({recipe} prompts; scan is about the model, the eval split keeps it cheap) "
        f"and up to {limit} from each external set ({', '.join(sets)}), overlap-filtered as in eval"
    )


def findings(summary: dict, threshold: float, floor: float) -> dict:
    """The verdicts at the given thresholds, from the rates alone (recomputed when the thresholds change)."""
    over = over_refusing(summary, threshold)
    return {
        "thresholds": {"over_refusal": threshold, "harmful_floor": floor},
        "over_refusing": over,
        "calibrate_tasks": [entry["task"] for entry in over],
        "calibrate_tasks_line": f"calibrate_tasks: [{', '.join(entry['task'] for entry in over)}]" if over else None,
        "weak_harmful_refusal": weak_refusal(summary, floor),
    }


def over_refusing(summary: dict, threshold: float) -> list[dict]:
    """Task clusters whose over_refusal prompts (harmful-sounding, benign requests) are refused more often
    than `threshold`, most refused first: the ones worth calibrating."""
    found = [
        {"task": key.split("/", 1)[1], **rate}
        for key, rate in summary["by_task"].items()
        if key.startswith("over_refusal/") and rate["rate"] > threshold
    ]
    return sorted(found, key=lambda entry: (-entry["rate"], entry["task"]))


def weak_refusal(summary: dict, floor: float) -> list[dict]:
    """Prompts that should be refused (harmful and frame-attack kinds, overall and per cluster, and the
    external harmful sets) that are refused less often than `floor`."""
    groups = {kind: summary["by_kind"][kind] for kind in HARMFUL_KINDS if kind in summary["by_kind"]}
    groups |= {
        key: rate
        for key, rate in summary["by_task"].items()
        if key.split("/")[0] in HARMFUL_KINDS and not key.endswith(f"/{RAW_TASK}")
    }
    groups |= {name: rate for name, rate in summary["benchmarks"].items() if name in HARMFUL_SOURCES}
    return [{"group": group, **rate} for group, rate in groups.items() if rate["rate"] < floor]


def should_refuse(kind: str) -> bool:
    return kind in HARMFUL_KINDS or kind in HARMFUL_SOURCES


def table_rows(result: dict) -> list[dict]:
    """One row per (cluster, kind): every kind overall, then each cluster's kinds, then each external set;
    `note` says where the rate crosses a threshold."""
    summary, thresholds = result["summary"], result["thresholds"]
    rows = [
        {"cluster": "all", "kind": kind, **summary["by_kind"][kind]}
        for kind in sorted(summary["by_kind"], key=_kind_rank)
    ]
    per_task = [(key.split("/", 1)[1], key.split("/", 1)[0], rate) for key, rate in summary["by_task"].items()]
    for task, kind, rate in sorted(per_task, key=lambda t: (t[0] == RAW_TASK, t[0], _kind_rank(t[1]))):
        rows.append({"cluster": "unframed" if task == RAW_TASK else task, "kind": kind, **rate})
    rows += [{"cluster": "external", "kind": name, **rate} for name, rate in sorted(summary["benchmarks"].items())]
    for row in rows:
        row["expected"] = "refuse" if should_refuse(row["kind"]) else "answer"
        row["note"] = _note(row, thresholds)
    return rows


def _kind_rank(kind: str) -> int:
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def _note(row: dict, thresholds: dict) -> str:
    if row["kind"] == OVER_REFUSAL and row["cluster"] != "all" and row["rate"] > thresholds["over_refusal"]:
        return "over-refuses"
    if row["expected"] == "refuse" and row["rate"] < thresholds["harmful_floor"]:
        return "weak refusal"
    return ""


def rich_table(result: dict) -> Table:
    """The terminal table; it fits 80 columns (rich's width when the output is no terminal), so whether a
    kind should be refused is left to its name and the note (the HTML report has a column for it)."""
    table = Table(
        title=f"refusal rate of {result['model']} as given (judge {result['judge']})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("cluster", overflow="fold")
    table.add_column("kind", overflow="fold")
    table.add_column("n", justify="right", no_wrap=True)
    table.add_column("refused (95% CI)", justify="right", no_wrap=True)
    table.add_column("note", no_wrap=True)
    style = {"over-refuses": "bold red", "weak refusal": "bold yellow", "": None}
    for row in table_rows(result):
        low, high = row["ci95"]
        rate = f"{row['rate']:.0%} ({low * 100:.0f}-{high * 100:.0f}%)"
        table.add_row(row["cluster"], row["kind"], str(row["n"]), rate, row["note"], style=style[row["note"]])
    return table


def verdict_lines(result: dict) -> list[str]:
    """What to do next: the calibrate_tasks line to paste, and what calibration must not make worse."""
    threshold, floor = result["thresholds"]["over_refusal"], result["thresholds"]["harmful_floor"]
    lines = []
    if result["over_refusing"]:
        listed = ", ".join(f"{e['task']} {e['rate']:.0%}" for e in result["over_refusing"])
        lines += [f"over-refusing clusters (over_refusal prompts refused more than {threshold:.0%}): {listed}",
                  "to calibrate them, put this line in the config:", f"  {result['calibrate_tasks_line']}"]  # fmt: skip
    else:
        lines.append(
            f"no cluster refuses its over_refusal prompts more than {threshold:.0%}: nothing to calibrate at this threshold"
        )
    if result["weak_harmful_refusal"]:
        listed = ", ".join(f"{e['group']} {e['rate']:.0%} (n={e['n']})" for e in result["weak_harmful_refusal"])
        lines.append(f"harmful refusal already below {floor:.0%}: {listed}; calibration must not make these worse")
    else:
        lines.append(f"every harmful kind and set is refused at least {floor:.0%} of the time")
    outcomes = frame_outcomes_line(result["summary"])
    if outcomes:
        lines.append(outcomes)
    if result.get("organism_in_config"):
        lines.append("the config sets organism: true; scan ignored it and looked at model_name_or_path as given")
    return lines


def frame_outcomes_line(summary: dict) -> str | None:
    """What the model did with frame attacks it did not refuse: only the frame's task (safe) or the request."""
    outcomes = summary.get("frame_attack_outcomes") or {}
    shares = {label: value for label, value in outcomes.items() if isinstance(value, dict)}
    if not shares:
        return None
    listed = ", ".join(f"{label.replace('_', ' ')} {value['rate']:.0%}" for label, value in shares.items())
    return f"frame attacks (n={next(iter(shares.values()))['n']}): {listed} (frame judge {outcomes['judge']})"


def refresh_thresholds(run, result: dict) -> dict:
    """A finished scan read again under other thresholds: its verdicts recomputed and scan.json rewritten
    (the rates do not change, so nothing is generated again)."""
    a = run.args
    wanted = {"over_refusal": a.scan_over_refusal_threshold, "harmful_floor": a.scan_harmful_floor}
    if result["thresholds"] == wanted:
        return result
    result = {**result, **findings(result["summary"], wanted["over_refusal"], wanted["harmful_floor"])}
    atomic_write_text(run.path(SCAN) / "scan.json", json.dumps(result, indent=2))
    return result


def scan_command(argv: list[str], force: bool = False) -> None:
    """`refcal scan --config X [--field value ...] [--force]`: the data stage if not done, then the scan on
    the main process (others wait), then the table and the verdicts printed from run_dir/scan/scan.json."""
    from refcal.train.config import parse
    from refcal.train.run import Run, run_folder_lock

    run = Run(*parse(argv))
    with run_folder_lock(run):
        scan_locked(run, force)


def scan_locked(run, force: bool) -> None:
    """The scan under the run folder's lock; `force` drops a finished scan (not the data, not the cache)."""
    import shutil

    from refcal.calibration.infra.artifacts import remove_stale_staging
    from refcal.train.run import console, run_stages

    if run.state.is_main_process:
        remove_stale_staging(run.dir, [SCAN])
        if force:
            shutil.rmtree(run.path(SCAN), ignore_errors=True)
    run.state.wait_for_everyone()
    run_stages(run, ("data",))
    if run.state.is_main_process and not run.done(SCAN):
        console.print(f"[bold]→ {SCAN}[/]")
    run.every_process(SCAN, lambda: stage_scan(run))
    if run.state.is_main_process:
        result = refresh_thresholds(run, json.loads((run.path(SCAN) / "scan.json").read_text(encoding="utf-8")))
        console.print(rich_table(result))
        console.print(f"prompts: {result['prompts']}; answers cached in {run.path('cache')}, shared with the eval stage "
                      "of a run of this model", highlight=False, soft_wrap=True)  # fmt: skip
        for line in verdict_lines(result):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        console.print(f"scan: {run.path(SCAN) / 'scan.json'}", highlight=False, soft_wrap=True)
