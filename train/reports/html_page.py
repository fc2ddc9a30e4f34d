"""`refcal report RUN_DIR`: one self-contained HTML page of a run (plots embedded as PNG data URIs).

It reads only what the stages wrote (geometry, train, eval, export, timings), so it works on a finished
run, on a run still in progress (missing stages are named, not guessed) and on a copied run folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: render to memory
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from refcal.calibration.geometry.directions import unit  # noqa: E402
from refcal.calibration.infra.artifacts import atomic_write_text  # noqa: E402
from refcal.calibration.judges.phrases import refused  # noqa: E402
from refcal.calibration.kinds import OVER_REFUSAL, REPORT_ORDER  # noqa: E402
from refcal.train.reports.tables import comparison_rows, gate_line  # noqa: E402

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 1em 0; }
.missing { color: #a00; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _figure_tag(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return _png_tag(buffer.getvalue(), alt)


def _png_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(what: str, stage: str) -> str:
    return f'<p class="missing">No {html.escape(what)}: the {stage} stage has not written it yet.</p>'


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def overview_section(run_dir: Path, card: dict | None) -> str:
    timings = _read_json(run_dir / "timings.json") or {}
    rows = [[stage, f"{seconds:.0f} s"] for stage, seconds in timings.items()]
    parts = ["<h2>Run</h2>", f"<p>Run folder: <code>{html.escape(str(run_dir))}</code></p>"]
    if card:
        parts.append(_table(["field", "value"], [
            ["model", card["model"]],
            ["calibrated model fingerprint", card["calibrated_model_fingerprint"]],
            ["calibrated tasks", ", ".join(card["calibrate_tasks"])],
            ["objective", card["training"].get("objective", "sft")],
            ["regularizer layers", card["training"]["regularizer_layers"]],
            ["training rows", card["training"]["rows"]],
            ["judge", card["evaluation"]["judge"]],
            ["safety gate", gate_line(_read_json(run_dir / "gate.json") or card.get("safety_gate"))],
            ["data rows hash", card["data_manifest"]["rows_hash"]],
            ["packages", ", ".join(f"{k} {v}" for k, v in (card.get("environment") or {}).get("packages", {}).items())],
        ]))  # fmt: skip
    gate = _read_json(run_dir / "gate.json")
    if gate and not card:  # the gate withheld the export: the page still says why
        parts.append(f"<p><b>Safety gate</b>: {html.escape(gate_line(gate))}</p>")
    if rows:
        parts += ["<h3>Stage times</h3>", _table(["stage", "wall time"], rows)]
    return "\n".join(parts)


def geometry_section(run_dir: Path) -> str:
    meta = _read_json(run_dir / "geometry" / "geometry.json")
    if meta is None:
        return "<h2>Geometry</h2>" + _missing("geometry", "geometry")
    chosen = meta["layer"]
    parts = ["<h2>Geometry</h2>", f"<p>Refusal layer (causal choice by ablation): <b>{chosen}</b>.</p>"]
    scores = meta.get("layer_scores") or []
    if scores:
        figure, left = plt.subplots(figsize=(7, 3.2))
        layers = [s["layer"] for s in scores]
        left.plot(layers, [s["refusal_score_drop"] for s in scores], marker="o", label="refusal score drop")
        left.set(
            xlabel="layer", ylabel="refusal score drop", title="layer choice: ablating each layer's harmful direction"
        )
        right = left.twinx()
        right.plot(layers, [s["benign_kl"] for s in scores], marker="s", color="tab:red", label="benign KL")
        right.set_ylabel("benign KL (nats)")
        left.axvline(chosen, color="grey", linestyle=":")
        figure.legend(loc="center left", fontsize=8)
        figure.tight_layout()
        parts.append(_figure_tag(figure, "layer choice"))
        parts.append(_table(["layer", "refusal score drop", "benign KL"], [
            [s["layer"], f"{s['refusal_score_drop']:.3f}", f"{s['benign_kl']:.3f}"] for s in scores
        ]))  # fmt: skip
    projection = _projection_figure(run_dir, meta)
    if projection:
        parts.append(projection)
    ranks = meta.get("ranks") or {}
    if ranks:
        parts.append("<h3>Over-refusal subspace rank at the refusal layer</h3>")
        parts.append(_table(["task", "rank"], [[task, per_layer[chosen]] for task, per_layer in sorted(ranks.items())]))
    return "\n".join(parts)


def _projection_figure(run_dir: Path, meta: dict) -> str | None:
    """Each group's mean projection on the layer's harmful direction r, scaled so that answered benign
    prompts sit at 0 and refused harmful ones at 1: where over-refusal rides on r, its rows sit near 1."""
    activations_path, responses_path = (
        run_dir / "geometry" / "activations.safetensors",
        run_dir / "geometry" / "responses.jsonl",
    )
    if not (activations_path.exists() and responses_path.exists() and (run_dir / "data" / "recipe").exists()):
        return None
    from datasets import load_from_disk

    rows = load_from_disk(str(run_dir / "data" / "recipe"))["train"].to_list()
    labels = {r["id"]: r["label"] for r in map(json.loads, responses_path.read_text(encoding="utf-8").splitlines())}
    activations = load_file(activations_path)["last_token"].float()  # [rows, layers, d]
    direction = unit(load_file(run_dir / "geometry" / "geometry.safetensors")["harmful"].float())  # [layers, d]
    projections = torch.einsum("nld,ld->nl", activations, direction)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        said = "refused" if refused(labels[row["id"]]) else "answered"
        name = f"over_refusal {row['task']}, {said}" if row["kind"] == OVER_REFUSAL else f"{row['kind']}, {said}"
        groups.setdefault(name, []).append(i)
    low, high = groups.get("benign, answered"), groups.get("harmful, refused")
    if not low or not high:
        return None
    zero, one = projections[low].mean(0), projections[high].mean(0)
    scale = (one - zero).where((one - zero).abs() > 1e-6, torch.ones_like(one))
    figure, axis = plt.subplots(figsize=(10, 3.8))
    shown = [
        (n, m)
        for n, m in sorted(groups.items())
        if n.startswith(("over_refusal", "harmful, refused", "benign, answered")) and len(m) >= 3
    ]
    for i, (name, members) in enumerate(shown):
        style = "--" if name.startswith("over_refusal") else "-"
        color = plt.cm.tab20(i % 20)  # more groups than the default cycle's ten colours
        axis.plot(
            ((projections[members].mean(0) - zero) / scale).tolist(),
            style,
            color=color,
            label=f"{name} ({len(members)})",
        )
    axis.axvline(meta["layer"], color="grey", linestyle=":")
    axis.set(xlabel="layer", ylabel="scaled projection on r", title="where each group sits along the harmful direction")
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return _figure_tag(figure, "projection on the harmful direction")


def training_section(run_dir: Path) -> str:
    history = _read_json(run_dir / "train" / "log_history.json")
    if history is None:
        return "<h2>Training</h2>" + _missing("training log", "train")
    steps = [entry for entry in history if "loss" in entry and "step" in entry]
    terms = sorted({k for e in steps for k in e if k == "loss" or k.startswith(("loss/", "rewards/"))})
    parts = ["<h2>Training</h2>"]
    if not steps:
        return "\n".join(parts + ["<p>No logged steps.</p>"])
    figure, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    for axis, term in zip(axes[0], terms):
        points = [(e["step"], e[term]) for e in steps if term in e]
        axis.plot(*zip(*points), marker=".")
        axis.set(title=term, xlabel="step")
    figure.tight_layout()
    parts.append(_figure_tag(figure, "training curves"))
    last = steps[-1]
    parts.append(
        _table(
            ["term", "first", "last"],
            [[t, f"{steps[0].get(t, float('nan')):.4f}", f"{last.get(t, float('nan')):.4f}"] for t in terms],
        )
    )
    train_record = _read_json(run_dir / "train" / "train.json") or {}
    if train_record.get("onset_tokens"):
        parts.append(
            f"<p>Refusal-onset tokens: <code>{html.escape(json.dumps(train_record['onset_tokens']))}</code></p>"
        )
    return "\n".join(parts)


def evaluation_section(run_dir: Path) -> str:
    results = _read_json(run_dir / "eval" / "results.json")
    if results is None:
        return "<h2>Evaluation</h2>" + _missing("evaluation", "eval")
    rows = [[label.strip(), b["n"], _pct(b["rate"]), _pct(a["rate"])] for label, b, a in comparison_rows(results)]
    kinds = [k for k in REPORT_ORDER if k in results["before"]["by_kind"]]
    figure, axis = plt.subplots(figsize=(7, 3))
    width = 0.38
    positions = range(len(kinds))
    for offset, when in ((-width / 2, "before"), (width / 2, "after")):
        axis.bar(
            [p + offset for p in positions], [results[when]["by_kind"][k]["rate"] for k in kinds], width, label=when
        )
    axis.set_xticks(list(positions), kinds)
    axis.set(ylabel="refusal rate", ylim=(0, 1), title="refusal on held-out prompts")
    axis.legend()
    figure.tight_layout()
    outcomes = results["after"].get("frame_attack_outcomes") or {}
    parts = [
        "<h2>Evaluation</h2>",
        f"<p>Judge <code>{html.escape(results['judge'])}</code>; held-out prompts only: the recipe's eval split "
        f"and the external sets' test halves. KL(before ‖ after) on benign prompts: {results['kl_benign']:.4f} nats/token.</p>",
        _figure_tag(figure, "refusal before and after"),
        _table(["prompts", "n", "before", "after"], rows),
    ]
    gate = _read_json(run_dir / "gate.json")
    if gate and "tolerance" in gate:
        parts += [f"<h3>Safety gate: {'passed' if gate['passed'] else 'failed'} ({html.escape(gate['on'])}; "
                  f"loss bound at most {gate['tolerance']:.0%})</h3>", _table(
            ["measure", "what", "n", "before", "after", "lost", "gained", "95% bound on the loss", "passed"],
            [[name, m["measure"], m["n"], _pct(m["before"]), _pct(m["after"]), m["lost"], m["gained"],
              _pct(m["loss_upper_bound"]), "yes" if m["passed"] else "NO"] for name, m in gate["measures"].items()],
        )]  # fmt: skip
        if gate["missing"]:
            parts.append(f"<p>Missing, so failed: {html.escape(', '.join(gate['missing']))}</p>")
    parts += helpfulness_table(results.get("helpfulness"))
    parts += answer_samples(run_dir / "eval" / "generations.jsonl")
    if outcomes:
        parts += ["<h3>Frame attacks after calibration</h3>", _table(
            ["outcome", "rate", "n"], [[k, _pct(v["rate"]), v["n"]] for k, v in outcomes.items() if isinstance(v, dict)]
        )]  # fmt: skip
    return "\n".join(parts)


def helpfulness_table(found: dict | None) -> list[str]:
    """Did the task on the test half's over_refusal rows: a non-refusal is not yet a helpful answer."""
    if not found:
        return []
    names = {
        "base": "model before refusal training",
        "organism": "before calibration",
        "calibrated": "after calibration",
    }
    rows = [[names[k], _pct(v["rate"]), v["n"]] for k, v in found["did_task_on_over_refusal"].items() if v]
    recovered = "-" if found["recovered"] is None else f"{found['recovered']:.2f}"
    return [
        f"<h3>Did the task on over_refusal rows (helpfulness recovered: {recovered})</h3>",
        _table(["model", "did the task", "n"], rows),
    ]


def answer_samples(path: Path, per_class: int = 2) -> list[str]:
    """A few test-half answers before and after for each kind and each class of the answer after
    calibration (train/reports/answer_classes.py), so a reader sees what "calibrated" looks like, not only its rate."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    shown: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        if record.get("half", "test") == "test" and "class_after" in record:
            group = record["kind"] if record["task"] == "benchmark" else f"{record['kind']} ({record['task']})"
            picked = shown.setdefault((record["kind"], record["class_after"]), [])
            if len(picked) < per_class:
                picked.append({**record, "group": group})
    if not shown:
        return []
    cut = lambda text: text if len(text) <= 160 else text[:157] + "..."  # noqa: E731
    rows = [
        [kind, cls, r["group"], cut(r["prompt"]), f"[{r['class_before']}] {cut(r['before'])}", cut(r["after"])]
        for (kind, cls), picked in sorted(shown.items())
        for r in picked
    ]
    header = ["kind", "class after", "task or set", "prompt", "before [class]", "after"]
    return ["<h3>Sample answers (test half)</h3>", _table(header, rows)]


def scan_section(run_dir: Path) -> str:
    """`refcal scan`'s findings: the model as given, per cluster and kind, with the clusters worth
    calibrating (as a config line) and the harmful refusals calibration must not make worse."""
    from refcal.train.stages.scan import frame_outcomes_line, table_rows

    result = _read_json(run_dir / "scan" / "scan.json")
    thresholds = result["thresholds"]
    parts = [
        "<h2>Scan</h2>",
        f"<p>The model as given, <code>{html.escape(result['model'])}</code>, before any calibration "
        f"(judge <code>{html.escape(result['judge'])}</code>). Prompts: {html.escape(result['prompts'])}.</p>",
    ]
    figure = _scan_figure(result["summary"]["by_task"], thresholds["over_refusal"])
    if figure:
        parts.append(figure)
    if result["calibrate_tasks_line"]:
        parts.append(f"<p>Over-refusing clusters (over_refusal prompts refused more than {thresholds['over_refusal']:.0%}); "
                     f"to calibrate them, put this line in the config: <code>{html.escape(result['calibrate_tasks_line'])}</code></p>")  # fmt: skip
    else:
        parts.append(f"<p>No cluster refuses its over_refusal prompts more than {thresholds['over_refusal']:.0%}.</p>")
    weak = ", ".join(f"{e['group']} {e['rate']:.0%} (n={e['n']})" for e in result["weak_harmful_refusal"])
    parts.append(f"<p>Harmful refusal already below {thresholds['harmful_floor']:.0%}, which calibration must not make worse: {html.escape(weak)}.</p>"
                 if weak else f"<p>Every harmful kind and set is refused at least {thresholds['harmful_floor']:.0%} of the time.</p>")  # fmt: skip
    outcomes = frame_outcomes_line(result["summary"])
    if outcomes:
        parts.append(f"<p>{html.escape(outcomes[0].upper() + outcomes[1:])}.</p>")
    rows = [
        [
            r["cluster"],
            r["kind"],
            r["expected"],
            r["n"],
            _pct(r["rate"]),
            f"{_pct(r['ci95'][0])}-{_pct(r['ci95'][1])}",
            r["note"],
        ]
        for r in table_rows(result)
    ]
    parts.append(_table(["cluster", "kind", "should", "n", "refused", "95% CI", "note"], rows))
    return "\n".join(parts)


def _scan_figure(by_task: dict, threshold: float) -> str | None:
    """Each cluster's over_refusal refusal rate with its 95% interval, against the threshold."""
    clusters = sorted((key.split("/", 1)[1], rate) for key, rate in by_task.items() if key.startswith("over_refusal/"))
    if not clusters:
        return None
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(clusters) + 1.2))
    rates = [rate["rate"] for _, rate in clusters]
    errors = [
        [r - rate["ci95"][0] for r, (_, rate) in zip(rates, clusters)],
        [rate["ci95"][1] - r for r, (_, rate) in zip(rates, clusters)],
    ]
    colours = ["tab:red" if r > threshold else "tab:blue" for r in rates]
    axis.barh(range(len(clusters)), rates, xerr=errors, color=colours, capsize=3)
    axis.set_yticks(range(len(clusters)), [name for name, _ in clusters])
    axis.invert_yaxis()  # the first cluster on top
    axis.axvline(threshold, color="grey", linestyle=":")
    axis.set(
        xlim=(0, 1), xlabel="refusal rate of over_refusal prompts (95% CI)", title="scan: over-refusal per cluster"
    )
    figure.tight_layout()
    return _figure_tag(figure, "scan: over-refusal per cluster")


def tune_section(run_dir: Path) -> str:
    """`refcal tune`'s trials (train/reports/tune_page.py): the Pareto plot, the table, and the chosen trial
    and the default form on the test half."""
    from refcal.train.reports.tune_page import COLUMNS, trial_rows

    report = _read_json(run_dir / "tune" / "tune.json")
    plot = run_dir / "tune" / "pareto.png"
    parts = [
        "<h2>Tune</h2>",
        f"<p>{len(report['trials'])} trials; objectives {html.escape(str(report['objectives']))}; constraint: "
        f"{html.escape(report['constraint'])}; choice: {html.escape(report['choice'])}.</p>",
        _png_tag(plot.read_bytes(), "tune trials") if plot.exists() else "",
        _table(list(COLUMNS), trial_rows(report)),
    ]
    for name, result in report.get("test_half", {}).items():
        helpful = (result.get("helpfulness") or {}).get("recovered")
        groups = ", ".join(f"{g} {e['rate']:.0%}" for g, e in result["over_refusal_by_group"]["calibrated"].items())
        parts.append(
            f"<p>Test half, {html.escape(name.replace('_', ' '))}: over-refusal {html.escape(groups)}, helpfulness "
            f"recovered {'-' if helpful is None else f'{helpful:.2f}'}, KL {result['kl_benign']:.3f}, gate "
            f"{'passed' if result['gate_passed'] else 'failed'}.</p>"
        )
    return "\n".join(parts)


def render(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    card = _read_json(run_dir / "export" / "adapter" / "calibration_card.json")
    sections = [
        overview_section(run_dir, card),
        geometry_section(run_dir),
        training_section(run_dir),
        evaluation_section(run_dir),
    ]
    if (run_dir / "scan" / "scan.json").exists():  # `refcal scan` ran here: its section comes right after the run's
        sections.insert(1, scan_section(run_dir))
    if (run_dir / "tune" / "tune.json").exists():  # `refcal tune` ran here
        sections.append(tune_section(run_dir))
    title = f"refcal run {run_dir.name}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    out = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_text(out, render(run_dir))
    return out
