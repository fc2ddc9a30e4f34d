"""The headline comparison over seeds, on the demo config: plain LoRA SFT, the recommended form (the onset
term alone) and the onset term with the self-distillation guard, on the same rows. Each seed has its own
data split (seed_data), its own organism and its own training seed (seed); every form of a seed shares its
data, organism and geometry.

Every figure is on the test half (the recipe's eval split, held-out tasks included, and the external sets'
test halves), with n and a 95% Wilson interval per seed; the mean over seeds is the headline, and
`differences_minus_plain` gives each form minus plain per seed, their mean and a 95% interval with the seed as
the unit (bench.seed_level). The safety gate's verdict (on the validation half) is kept per run.

    python -m bench.seeds                  # run what is missing (about 15 minutes a seed on 2 CPU cores)
    python -m bench.seeds --collect-only   # only write bench/results/seeds.{json,md}
    python -m bench.seeds --from-results   # the same from the committed seeds.json's per-seed figures
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench import runner
from bench.calibration_table import write_outputs
from bench.seed_level import seed_bootstrap

ROOT = runner.ROOT
RUNS = ROOT / "runs" / "seeds"
CONFIG = "configs/demo_smollm2.yaml"
SEEDS = (0, 1, 2)
# each form names its loss terms, so a run's settings do not move when a default does
FORMS = {
    "plain_sft": ["--config", "configs/forms/plain_sft.yaml"],
    "onset": ["--distill_weight", "0"],
    "distill": ["--distill_weight", "1"],
}
RECOMMENDED = "onset"  # the config defaults
LENDER = "onset"  # the first form of a seed, whose data, organism and geometry the others share
SHARED = ("data", "organism", "geometry")  # the same for every form of a seed
# (label, where in summary.json, key): over-refusal first, then what must stay refused
MEASURES = [
    ("over-refusal, trained tasks", "over_refusal_by_group", "trained"),
    ("over-refusal, held-out tasks", "over_refusal_by_group", "held_out"),
    ("benign", "by_kind", "benign"),
    ("XSTest safe", "external", "xstest_safe"),
    ("OKTest", "external", "oktest"),
    ("CoCoNot contrast", "external", "coconot_contrast"),
    ("JBB benign", "external", "jbb_benign"),
    ("harmful (recipe)", "by_kind", "harmful"),
    ("XSTest unsafe", "external", "xstest_unsafe"),
    ("StrongREJECT", "external", "strongreject"),
    ("HarmBench", "external", "harmbench_test"),
    ("JBB harmful", "external", "jbb_harmful"),
]


def run(seed: int, form: str) -> Path:
    """One form on one seed; the other forms share the lender's data, organism and geometry (run first)."""
    lender = None if form == LENDER else run(seed, LENDER)
    return run_form(seed, FORMS[form], RUNS / f"seed{seed}" / form, lender)


def run_form(seed: int, flags: list[str], run_dir: Path, shared_from: Path | None) -> Path:
    """The demo config with these flags on one seed (its data split, organism and training seed), unless a run
    with the same settings finished already; `shared_from` lends its data, organism and geometry."""
    flags = [*flags, "--seed_data", str(seed), "--seed", str(seed)]
    settings = {"key": runner.settings_key([CONFIG], flags)}
    lend = {stage: shared_from / stage for stage in SHARED} if shared_from is not None else None
    if not runner.start(run_dir, settings, notes={"flags": flags}, finished="summary.json", lend=lend):
        runner.train_cli(["run", "--config", CONFIG, *flags, "--run_dir", str(run_dir), "--output_dir",
                          str(run_dir / "train"), "--strict_gate", "false"], env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    return run_dir


def figures(summary: dict) -> dict:
    """Each measure before (organism) and after (this form), as Wilson entries, from a run's summary.json."""
    out = {}
    for label, block, key in MEASURES:
        if block == "external":
            entry = summary["external"]["test"].get(key)
            out[label] = entry and {"organism": entry["organism"], "calibrated": entry["calibrated"]}
        elif block == "over_refusal_by_group":
            groups = summary["over_refusal_by_group"]
            out[label] = {side: (groups[side] or {}).get(key) for side in ("organism", "calibrated")}
        else:
            out[label] = {side: wilson_of(summary, side, key) for side in ("organism", "calibrated")}
    return out


def wilson_of(summary: dict, side: str, kind: str) -> dict | None:
    from refcal.calibration.evaluation import wilson_rate

    rate = summary[side]["by_kind"].get(kind)
    n = sum(v for k, v in summary["n"].items() if k.split("/")[0] == kind)
    return None if rate is None or not n else wilson_rate(round(rate * n), n)


def collect() -> dict:
    """The report from the run folders."""
    per_seed, gates = {}, {}
    for seed in SEEDS:
        for form in FORMS:
            path = RUNS / f"seed{seed}" / form / "summary.json"
            if not path.is_file():
                continue
            summary = json.loads(path.read_text())
            per_seed.setdefault(str(seed), {})[form] = figures(summary) | {"kl_benign": summary["kl_benign"]}
            gate = summary.get("safety_gate") or {}
            gates.setdefault(str(seed), {})[form] = {"passed": gate.get("passed"), "failed": gate.get("failed")}
    return report_of(per_seed, gates)


def report_of(per_seed: dict, gates: dict) -> dict:
    """The report from the per-seed figures and gate verdicts: the means and differences are derived."""
    complete = [s for s, forms in per_seed.items() if set(forms) == set(FORMS)]
    mean, differences = {}, {}
    for label, _, _ in MEASURES:
        seeds = [s for s in complete if all(per_seed[s][form].get(label) for form in FORMS)]
        rates = lambda form, side: [per_seed[s][form][label][side]["rate"] for s in seeds]  # noqa: E731
        mean[label] = {
            "organism": _mean(rates(LENDER, "organism")),
            **{form: _mean(rates(form, "calibrated")) for form in FORMS},
        }
        for form in FORMS:
            if form != "plain_sft":
                diffs = [a - b for a, b in zip(rates(form, "calibrated"), rates("plain_sft", "calibrated"))]
                entry = {"per_seed": [round(d, 4) for d in diffs], "mean": _mean(diffs)}
                if seeds:
                    pairs = [(per_seed[s]["plain_sft"][label]["calibrated"], per_seed[s][form][label]["calibrated"])
                             for s in seeds]  # fmt: skip
                    found = seed_bootstrap([(*counts(a), *counts(b)) for a, b in pairs])
                    entry |= {"ci95": found["ci95"], "signs_agree": found["signs_agree"]}
                differences.setdefault(form, {})[label] = entry
    return {
        "command": "python -m bench.seeds",
        "config": CONFIG,
        "forms": FORMS,
        "recommended": RECOMMENDED,
        "seeds": complete,
        "halves": "test half only: recipe eval split (held-out tasks included) and each external set's test half",
        "mean": mean,
        "differences_minus_plain": differences,
        "per_seed": per_seed,
        "safety_gate": gates,
    }


def counts(entry: dict) -> tuple[int, int]:
    """(refused, n) of a Wilson entry."""
    return round(entry["rate"] * entry["n"]), entry["n"]


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def minus_plain(entry: dict) -> str:
    """A form minus plain SFT as "+3% [-8%, +15%]; +0%, +32%, -24%"."""
    per_seed = ", ".join(f"{d:+.0%}" for d in entry["per_seed"])
    if entry.get("ci95") is None:
        return per_seed or "-"
    low, high = entry["ci95"]
    return f"{entry['mean']:+.0%} [{low:+.0%}, {high:+.0%}]; {per_seed}"


def markdown(report: dict) -> str:
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    others = [form for form in report["forms"] if form != "plain_sft"]
    name = lambda form: f"{form} (recommended)" if form == report["recommended"] else form  # noqa: E731
    lines = [
        f"# Seeds: plain LoRA SFT against {', '.join(others)} ({len(report['seeds'])} seeds)",
        "",
        "Generated by `python -m bench.seeds` from runs/seeds; refusal rates on the test half, mean over seeds "
        "(each seed its own data split and organism), and each form minus plain SFT: the mean over seeds "
        "[95% bootstrap interval resampling seeds, then prompts] and each seed's difference. Per-seed n and "
        "95% Wilson intervals are in seeds.json.",
        "",
        "| measure | organism | plain LoRA SFT | "
        + " | ".join(f"{name(form)} | minus plain [95%]; per seed" for form in others)
        + " |",
        "|---|---:|---:|" + "---:|---|" * len(others),
    ]
    for label, row in report["mean"].items():
        cells = [f"{pct(row[form])} | {minus_plain(report['differences_minus_plain'][form][label])}" for form in others]
        lines.append(f"| {label} | {pct(row['organism'])} | {pct(row['plain_sft'])} | " + " | ".join(cells) + " |")
    lines += ["", "Safety gate (validation half), per seed:", ""]
    for seed, forms in report["safety_gate"].items():
        verdicts = "; ".join(
            f"{form} {'passed' if g['passed'] else 'failed: ' + ', '.join(f.split(' keeps')[0] for f in g['failed'])}"
            for form, g in forms.items()
        )
        lines.append(f"- seed {seed}: {verdicts}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument(
        "--from-results", action="store_true", help="derive the means and differences again from OUT.json"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "seeds"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.from_results:  # the run folders are not committed; the per-seed figures are
        committed = json.loads(out.with_suffix(".json").read_text())
        write_outputs(report_of(committed["per_seed"], committed["safety_gate"]), out, markdown)
        return
    if not args.collect_only:
        for seed in SEEDS:
            for form in FORMS:
                run(seed, form)
    write_outputs(collect(), out, markdown)


if __name__ == "__main__":
    main()
