"""Human-readable results: the before/after table (terminal and Markdown) and the demo summary."""

from __future__ import annotations

from rich.table import Table

from refcal.calibration.kinds import OVER_REFUSAL, REPORT_ORDER


def comparison_rows(results: dict) -> list[tuple[str, dict, dict]]:
    """(label, before, after) for kinds, over-refusal per task group and per task, and benchmarks (test half)."""
    before, after = results["before"], results["after"]
    rows = [
        (kind, before["by_kind"][kind], after["by_kind"][kind]) for kind in REPORT_ORDER if kind in before["by_kind"]
    ]
    groups = before.get("over_refusal_by_group", {})
    rows += [(f"  {group} tasks", groups[group], after["over_refusal_by_group"][group]) for group in sorted(groups)]
    rows += [
        (f"  {key}", before["by_task"][key], after["by_task"][key])
        for key in sorted(before["by_task"])
        if key.startswith(f"{OVER_REFUSAL}/")
    ]
    rows += [(name, before["benchmarks"][name], after["benchmarks"][name]) for name in sorted(before["benchmarks"])]
    return rows


def rich_table(results: dict, title: str = "refusal rate") -> Table:
    table = Table(title=title)
    for column in ("prompts", "n", "before", "after"):
        table.add_column(column, justify="left" if column == "prompts" else "right")
    for label, b, a in comparison_rows(results):
        table.add_row(label, str(b["n"]), f"{b['rate']:.0%}", f"{a['rate']:.0%}")
    table.caption = f"KL(before || after) on benign prompts: {results['kl_benign']:.4f} nats/token"
    return table


def markdown_table(results: dict) -> str:
    lines = ["| prompts | n | before | after |", "|---|---:|---:|---:|"]
    for label, b, a in comparison_rows(results):
        lines.append(f"| {label.strip()} | {b['n']} | {b['rate']:.0%} | {a['rate']:.0%} |")
    lines.append(f"\nKL(before ‖ after) on benign prompts: {results['kl_benign']:.4f} nats/token.")
    return "\n".join(lines)


def card_markdown(card: dict) -> str:
    organism = card.get("organism") or {}
    geometry = card["geometry"]
    return "\n".join(
        [
            "# refcal calibration card",
            "",
            f"- model: `{card['model']}`",
            f"- calibrated model: `{card['calibrated_model']}` (fingerprint `{card['calibrated_model_fingerprint']}`)",
            f"- organism over-refusal tasks: {organism.get('over_refusal_tasks', '-')}; held out: {organism.get('held_out_tasks', '-')}",
            f"- refusal layer (causal choice): {geometry['layer']}; subspace ranks there: {geometry['ranks_at_layer']}",
            f"- regularizer layers: {card['training']['regularizer_layers']}; training rows: {card['training']['rows']}",
            f"- base weights in training: {card['training'].get('base_weights', 'unquantised')}; "
            f"geometry measured on: {card['training'].get('geometry_weights', 'unquantised')} weights",
            f"- judge: {judge_line(card.get('judge') or {'version': card['evaluation']['judge']})}",
            f"- safety gate: {gate_line(card.get('safety_gate'))}",
            f"- held-out tasks (no rows of any kind trained): {card['data_manifest'].get('held_out_tasks') or '-'}",
            f"- data rows hash: `{card['data_manifest']['rows_hash']}`",
            "",
            "Load with `PeftModel.from_pretrained(base, this_folder)`.",
            "",
            "## Refusal rates on held-out prompts",
            "",
            markdown_table(card["evaluation"]),
            "",
        ]
    )


def demo_summary(card: dict, wall_seconds: float, stage_seconds: dict) -> dict:
    """The fields bench/results/demo.json promises: rates before (organism) and after (calibrated) on the
    test half, and every external set on both halves with n and 95% Wilson intervals."""
    ev = card["evaluation"]
    rate = lambda block, key: block.get(key, {}).get("rate")  # noqa: E731
    pick = lambda when: {  # noqa: E731
        "by_kind": {k: rate(ev[when]["by_kind"], k) for k in REPORT_ORDER},
        "over_refusal_by_group": {k: v["rate"] for k, v in ev[when].get("over_refusal_by_group", {}).items()},
        "by_task": {k: v["rate"] for k, v in ev[when]["by_task"].items()},
        **{name: entry["rate"] for name, entry in ev[when]["benchmarks"].items()},
    }
    sides = {"organism": "before", "calibrated": "after"}
    halves = {"test": ev, "validation": ev.get("validation", {})}
    organism = card.get("organism") or {}
    return {
        "wall_seconds": round(wall_seconds, 1),
        "stage_seconds": stage_seconds,
        "model": card["model"],
        "organism_over_refusal_tasks": organism.get("over_refusal_tasks"),
        "task_groups": ev.get("task_groups"),
        "held_out_tasks": card["data_manifest"].get("held_out_tasks"),
        "refusal_layer": card["geometry"]["layer"],
        "regularizer_layers": card["training"]["regularizer_layers"],
        "judge": ev["judge"],
        "computed_on": ev.get("computed_on"),
        "organism": pick("before"),
        "calibrated": pick("after"),
        "kl_benign": ev["kl_benign"],
        "over_refusal_by_group": {side: ev[when].get("over_refusal_by_group") for side, when in sides.items()},
        "external": {
            half: {
                name: {side: results[when]["benchmarks"][name] for side, when in sides.items()}
                for name in sorted(results["before"]["benchmarks"])
            }
            for half, results in halves.items()
            if results
        },
        "what_answers_did": {
            side: {key: ev[when][key] for key in ("frame_attack_outcomes", "over_refusal_outcomes") if key in ev[when]}
            for side, when in sides.items()
        },
        "helpfulness": ev.get("helpfulness"),
        "safety_gate": card.get("safety_gate"),
        "near_copy_contents_dropped": card["data_manifest"].get("near_copy_contents_dropped"),
        "n": {k: v["n"] for k, v in ev["before"]["by_task"].items()}
        | {k: v["n"] for k, v in ev["before"]["benchmarks"].items()},
        "targets": card["targets"],
    }


def judge_line(judge: dict) -> str:
    validation = judge.get("validation")
    if not validation:
        return f"`{judge['version']}` (no validation figures recorded for this version)"
    worst = min(validation["binary_agreement"].values())
    line = f"`{judge['version']}`; binary agreement with people {worst:.3f} or better on each model ({validation['method']})"
    frame = validation.get("frame_attack_label")
    if frame:
        line += f"; frame-attack outcome agreement {frame['three_way_agreement']['rate']:.3f} on {frame['three_way_agreement']['n']} held-out hand labels"
    return line


def gate_line(gate: dict | None) -> str:
    if gate is None:
        return "not applied"
    if "tolerance" not in gate:  # a verdict of the ratio rule, recorded without paired bounds
        return (
            f"{'passed' if gate['passed'] else 'FAILED'} (ratio rule; `refcal export --force` applies the paired gate)"
        )
    verdict = (
        "passed"
        if gate["passed"]
        else "FAILED, exported anyway (--force_export)"
        if gate["forced"]
        else "FAILED, export withheld"
    )
    shown = ", ".join(
        f"{name} {m['before']:.0%} -> {m['after']:.0%} (n={m['n']}, bound {m['loss_upper_bound']:.0%})"
        for name, m in gate["measures"].items()
    )
    return f"{verdict} on the {gate['on']} (each harmful-side measure's 95% upper bound on its loss of safe answers <= {gate['tolerance']:.0%}; refused, or for frame_attack and over_refusal rows not carried out): {shown}"  # fmt: skip


def gate_report(gate: dict) -> str:
    """The verdict as the run prints it: one line, then each failing measure on its own line."""
    lines = [f"safety gate: {gate_line(gate)}"]
    lines += [f"  failed: {failure}" for failure in gate["failed"]]
    return "\n".join(lines)
