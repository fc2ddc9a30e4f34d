"""Side-by-side calibration variants on the demo's organism: plain LoRA SFT vs the regularizer's forms.

Every variant reuses the data, organism, geometry and targets of the benchmark's regularized SFT run
(runs/bench/refcal_sft, from `python -m bench.calibration_table`), so they differ only in the training
settings given below, and is evaluated on the same held-out prompts.

    python -m bench.calibration_variants                 # train + eval every missing variant, then collect
    python -m bench.calibration_variants --collect-only  # only gather runs/variants/*/eval into the JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import runner
from bench.calibration_table import PLAIN_SFT, SHARED, cli
from bench.pooling import pooled

ROOT = runner.ROOT
VARIANTS = {
    # 1 epoch at the causally chosen layer unless a variant says otherwise (the regularized SFT form's)
    "demo_config": [],  # the base run itself: its eval is reused, not retrained
    "plain_sft_1ep": PLAIN_SFT,
    "keep10_1ep": ["--keep_weight", "10"],
    "no_r_collapse_1ep": ["--collapse_harmful_component", "false"],
    "plain_sft_2ep": PLAIN_SFT + ["--num_train_epochs", "2"],
    "weights1_2ep": ["--num_train_epochs", "2"],
}


def base_identity(base: Path) -> dict:
    """What a variant inherits from the base run; a variant trained on another base is stale."""
    return {
        "rows_hash": json.loads((base / "data" / "manifest.json").read_text())["rows_hash"],
        "organism": json.loads((base / "organism" / "organism.json").read_text())["key"],
        "layer": json.loads((base / "geometry" / "geometry.json").read_text())["layer"],
        "targets": json.loads((base / "sft_data" / "targets.json").read_text()),
    }


# a variant's folder records the base it was trained on (base.json): one trained on another base is stale
MADE_ON_BASE = {"marker": "base.json", "finished": "eval/results.json"}


def trained_on(name: str, identity: dict) -> bool:
    return runner.made_with(ROOT / "runs" / "variants" / name, identity, **MADE_ON_BASE)


def run_variant(name: str, flags: list[str], base: Path, identity: dict, config: str) -> None:
    run_dir = ROOT / "runs" / "variants" / name
    # the base run itself (no flags): training it again would give the same bytes, so its eval is reused
    lend = {stage: base / stage for stage in (SHARED if flags else ("eval",))}
    if not runner.start(run_dir, identity, lend=lend, **MADE_ON_BASE) and flags:
        for stage in ("train", "eval"):
            cli(stage, config, run_dir, flags)


def over_refusal(block: dict, tasks: list[str]) -> dict:
    return pooled([block[f"over_refusal/{t}"] for t in tasks])


def collect(name: str, calibrated: list[str], held_out: list[str]) -> dict:
    results = json.loads((ROOT / "runs" / "variants" / name / "eval" / "results.json").read_text())
    before, after = results["before"], results["after"]
    row = {"flags": VARIANTS[name], "kl_benign": results["kl_benign"]}
    for label, tasks in (("over_refusal_calibrated_tasks", calibrated), ("over_refusal_held_out_tasks", held_out)):
        b, a = over_refusal(before["by_task"], tasks), over_refusal(after["by_task"], tasks)
        row[label] = {
            "before": b["rate"],
            "after": a["rate"],
            "n": b["n"],
            "relative_drop": round(1 - a["rate"] / b["rate"], 4),
        }
    for kind in ("harmful", "frame_attack", "benign"):
        b, a = before["by_kind"][kind], after["by_kind"][kind]
        row[kind] = {"before": b["rate"], "after": a["rate"], "n": b["n"], "kept": round(a["rate"] / b["rate"], 4)}
    for name_, a in after["benchmarks"].items():
        row[name_] = {"before": before["benchmarks"][name_]["rate"], "after": a["rate"], "n": a["n"]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/bench/refcal_sft")  # the table's regularized SFT run
    parser.add_argument("--config", default="configs/demo_smollm2.yaml")
    parser.add_argument("--out", default="bench/results/calibration_variants.json")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="Train only these variants (collect all).")
    args = parser.parse_args()
    base = ROOT / args.base
    organism = json.loads((base / "organism" / "organism.json").read_text())
    calibrated, held_out = organism["over_refusal_tasks"], organism["held_out_tasks"]
    identity = base_identity(base)
    done = {}
    for name, flags in VARIANTS.items():
        if not args.collect_only and (not args.only or name in args.only):
            run_variant(name, flags, base, identity, args.config)
        if trained_on(name, identity):
            done[name] = collect(name, calibrated, held_out)
    report = {"base_run": args.base, "calibrated_tasks": calibrated, "held_out_tasks": held_out, "variants": done}
    (ROOT / args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(done))


def markdown(rows: dict) -> str:
    """The README's table."""
    lines = [
        "| variant | over-refusal, calibrated tasks (drop) | harmful kept | frame_attack kept | benign refusal | KL |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        o, h, f, b = row["over_refusal_calibrated_tasks"], row["harmful"], row["frame_attack"], row["benign"]
        lines.append(
            f"| {name} | {o['before']:.0%} → {o['after']:.0%} ({o['relative_drop']:.0%}) | {h['kept']:.0%} | "
            f"{f['kept']:.0%} | {b['before']:.0%} → {b['after']:.0%} | {row['kl_benign']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
