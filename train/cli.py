"""The `refcal` command: one subcommand per stage, and `run` for the whole pipeline.

refcal run --config configs/demo_smollm2.yaml
refcal geometry --config configs/demo_smollm2.yaml --subspace_max_rank 6
accelerate launch train.py --config configs/demo_smollm2.yaml     (same as `refcal run`)
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from rich.console import Console
from rich.markup import escape

from refcal.calibration.infra.artifacts import atomic_write_text
from refcal.calibration.infra.errors import UserError
from refcal.train.run import EXTRA_STAGES, STAGES, Run, console, run_folder_lock, run_stages

USAGE = f"""usage: refcal {{run,{",".join(STAGES + EXTRA_STAGES)}}} --config FILE [--field value ...] [--force]
       refcal scan --config FILE [--scan_over_refusal_threshold 0.2] [--scan_harmful_floor 0.8] [--force]
       refcal tune --config FILE [--trials N] [--tune_storage URL]
       refcal geometry --config FILE --report DIR
       refcal retrain --config FILE --adapter DIR --tasks NEW.yaml [...] [--run_dir DIR]
       refcal chat --adapter DIR [--compare]
       refcal report RUN_DIR [--out FILE]

Stages write folders under run_dir and are skipped when already done; --force redoes the named stage.
`scan` shows where the model, as given (never an organism), refuses too much or too little: per-cluster
refusal rates on the eval stage's prompts, a calibrate_tasks line to paste, the weak harmful refusals.
`baselines` evaluates the inference-time interventions (global ablation, false-refusal ablation,
task-conditioned steering) on the frozen model with the eval stage's prompts; needs the geometry stage.
`tune` searches, per model, the training settings (learning rate, epochs, onset and distill weights, LoRA
rank, the over_refusal rows' target source) for the strongest calibration the safety gate passes, each
trial scored on the validation half; the chosen trial and the default form are then evaluated once on the
test half (run_dir/tune/tune.json). A config with `tune: true` makes `run` do the same.
`retrain` trains an exported adapter further on new task clusters, keeping the old ones calibrated.
`chat` tries an exported adapter in the terminal (`refcal chat --help`).
`report` writes one self-contained HTML page of a run: geometry, every loss term's curve, before/after tables.
`geometry --report DIR` also writes the geometry analysis (Markdown, PNG plots, JSON) into DIR.
`export --merge` also writes the calibrated model with the adapter merged in (run_dir/export/merged).
Every field of the config (refcal's, TRL's ModelConfig and SFTConfig) can be set by flag.
`refcal STAGE --help` lists them all."""


def run_pipeline(
    argv: list[str],
    stages: tuple[str, ...] = STAGES,
    force: bool = False,
    report: str | None = None,
    retrain_from: dict | None = None,
) -> None:
    from refcal.train.config import parse

    started = time.time()
    model_args, args, training_args = parse(argv)

    run = Run(model_args, args, training_args)
    if args.tune and stages == STAGES:  # the tune takes the run folder's lock itself, stage by stage
        return tune_and_show(run)
    with run_folder_lock(run):
        run_locked(run, stages, force, report, retrain_from, started)


def run_locked(
    run: Run, stages: tuple[str, ...], force: bool, report: str | None, retrain_from: dict | None, started: float
) -> None:
    from refcal.train.processes import describe

    if run.state.is_main_process and ("train" in stages or "organism" in stages):
        console.print(f"training on {describe(run.state, run.training_args)}", highlight=False, soft_wrap=True)
    if force and run.state.is_main_process:
        for stage in stages:
            shutil.rmtree(run.path(stage), ignore_errors=True)
    run.state.wait_for_everyone()
    seconds = {}
    if retrain_from is not None:
        from refcal.train.retrain import reuse_parent_stages

        seconds = run_stages(run, ("data",))
        stages = stages[1:]
        if run.state.is_main_process:
            reused = reuse_parent_stages(run, retrain_from)
            if reused:
                console.print(f"reused from the parent run {retrain_from['run_dir']}: {', '.join(reused)}")
        run.state.wait_for_everyone()
    seconds.update(run_stages(run, stages))
    if report and run.state.is_main_process:
        from refcal.train.stages.geometry import geometry_report

        console.print(f"geometry report -> {geometry_report(run, report)}")
    if run.state.is_main_process and "baselines" in stages:
        from refcal.train.stages.baselines import markdown_table

        text = (run.path("baselines") / "results.json").read_text()
        if run.args.baselines_json:
            atomic_write_text(run.args.baselines_json, text)
        print(markdown_table(json.loads(text)))
    if run.state.is_main_process and "export" in stages:
        finish(run, time.time() - started, seconds)


def finish(run: Run, wall_seconds: float, seconds: dict) -> None:
    """The table, the safety gate's verdict, the summary and the report page; with strict_gate, status 3
    when the gate withheld the export."""
    from refcal.train.reports.tables import demo_summary, gate_report, rich_table
    from refcal.train.stages.export import calibration_card, gate_verdict, withholds_export

    gate = gate_verdict(run)
    card = {**calibration_card(run), "safety_gate": gate}
    console.print(rich_table(card["evaluation"], f"refusal rate (judge {card['evaluation']['judge']})"))
    console.print(gate_report(gate), highlight=False, soft_wrap=True)
    atomic_write_text(run.path("gate.json"), json.dumps(gate, indent=2))
    summary = demo_summary(card, wall_seconds, seconds)
    text = json.dumps(summary, indent=2)
    atomic_write_text(run.path("summary.json"), text)
    if run.args.summary_json:
        atomic_write_text(run.args.summary_json, text)
    from refcal.train.reports.html_page import write_report

    report = write_report(run.dir)
    withheld = withholds_export(gate) and not run.done("export")  # an earlier export stays where it is
    adapter = "withheld by the safety gate" if withheld else run.path("export") / "adapter"
    console.print(  # soft_wrap: paths stay whole, to be copied
        f"wall time {wall_seconds:.0f}s; adapter: {adapter}; summary: {run.path('summary.json')}; report: {report}",
        soft_wrap=True,
        highlight=False,
    )
    if withheld and run.args.strict_gate:
        raise SystemExit(3)


def retrain(rest: list[str]) -> None:
    from refcal.train.config import parse
    from refcal.train.retrain import parent_card, retrain_overrides

    adapter, new_tasks = _take(rest, "--adapter"), _take(rest, "--tasks", many=True)
    if not adapter or not new_tasks:
        raise SystemExit("refcal retrain needs --adapter DIR (an exported adapter) and --tasks NEW.yaml [...]")
    _, args, _ = parse(rest)
    card = parent_card(adapter)
    run_dir = args.run_dir if args.run_dir != card["run_dir"] else f"{card['run_dir']}-retrain"
    run_pipeline(rest + retrain_overrides(card, adapter, new_tasks, args.tasks, run_dir), retrain_from=card)


def report_command(rest: list[str]) -> None:
    if not rest or rest[0] in ("-h", "--help"):
        print("usage: refcal report RUN_DIR [--out FILE]   (default FILE: RUN_DIR/report.html)")
        return
    from refcal.train.reports.html_page import write_report

    out = _take(rest, "--out")
    if len(rest) != 1:
        raise SystemExit(f"refcal report takes one run folder, got {rest}")
    try:
        console.print(f"report -> {write_report(rest[0], out)}")
    except FileNotFoundError as error:
        raise SystemExit(f"refcal report: {error}") from error


def tune_command(rest: list[str]) -> None:
    """`refcal tune --config FILE [--trials N]`: the search (train/stages/tune.py), its table and plot."""
    from refcal.train.config import parse

    trials = _take(rest, "--trials")
    tune_and_show(Run(*parse(rest + (["--tune_trials", trials] if trials else []))))


def tune_and_show(run: Run) -> None:
    from refcal.train.reports.html_page import write_report
    from refcal.train.reports.tune_page import rich_trials
    from refcal.train.stages.tune import stage_tune

    report = stage_tune(run)
    if run.state.is_main_process:
        Console(stderr=True, width=max(console.width, 150)).print(rich_trials(report))  # whole columns, in a log too
        chosen = report["test_half"].get("chosen")
        where = (
            f"adapter: {chosen['run_dir']}/export/adapter"
            if chosen and chosen["exported"]
            else "no trial passed the gate"
        )
        console.print(
            f"{where}; trials: {run.path('tune') / 'tune.json'}; report: {write_report(run.dir)}",
            soft_wrap=True,
            highlight=False,
        )


def _take(argv: list[str], flag: str, many: bool = False):
    """Remove `flag` and its value(s) from argv and return them."""
    if flag not in argv:
        return [] if many else None
    at = argv.index(flag)
    end = at + 1
    while end < len(argv) and not argv[end].startswith("--") and (many or end == at + 1):
        end += 1
    values = argv[at + 1 : end]
    del argv[at:end]
    return values if many else (values[0] if values else None)


COMMANDS = ("run", *STAGES, *EXTRA_STAGES, "scan", "tune", "retrain", "report", "chat")


def main(argv: list[str] | None = None) -> None:
    try:
        dispatch(list(sys.argv[1:] if argv is None else argv))
    except (UserError, FloatingPointError) as error:  # a message that says what to fix: one line, no traceback
        Console(stderr=True).print(f"[red]refcal: error: {escape(str(error))}[/]", highlight=False, soft_wrap=True)
        raise SystemExit(2) from error


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "retrain":
        return retrain(rest)
    if command == "report":
        return report_command(rest)
    if command == "tune":
        return tune_command(rest)
    if command == "chat":
        from refcal.train.chat import main as chat_main

        return chat_main(rest)
    if command not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"refcal: unknown command {command!r}")
    if "-h" in rest or "--help" in rest:
        from refcal.train.config import field_help

        print(field_help().replace("refcal STAGE", f"refcal {command}", 1))
        return
    force = "--force" in rest
    rest = [a for a in rest if a != "--force"]
    if command == "scan":
        from refcal.train.stages.scan import scan_command

        return scan_command(rest, force)
    if "--merge" in rest:
        if command not in ("export", "run"):
            raise SystemExit("refcal: --merge goes with the export (or run) command")
        rest = [a for a in rest if a != "--merge"] + ["--export_merge", "true"]
    report = None
    if "--report" in rest:
        at = rest.index("--report")
        if command != "geometry" or at + 1 >= len(rest):
            raise SystemExit("refcal: --report DIR goes with the geometry command")
        report = rest[at + 1]
        del rest[at : at + 2]
    run_pipeline(rest, STAGES if command == "run" else (command,), force, report)


if __name__ == "__main__":
    main()
