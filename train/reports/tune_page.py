"""`refcal tune`'s results for people: the trials as table rows (the terminal's table here, the report
page's in html_page) and the Pareto plot of over-refusal against harmful refusal kept, gate failures marked
and the chosen trial highlighted."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: render to a file
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

COLUMNS = ("trial", "learning rate", "epochs", "onset", "distill", "rank", "targets", "over-refusal", "did the task", "harmful kept", "KL", "gate")  # fmt: skip


def trial_rows(report: dict) -> list[list[str]]:
    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    rows = []
    for t in report["trials"]:
        s, p = t["scores"], t["settings"]
        mark = " (chosen)" if t["number"] == report["chosen"] else ""
        rows.append(
            [
                f"{t['number']}{mark}",
                f"{p['learning_rate']:.2g}",
                f"{p['num_train_epochs']:g}",
                f"{p['onset_weight']:.2g}",
                f"{p['distill_weight']:g}",
                str(p["lora_r"]),
                p.get("objective", "-"),  # a study searched without it kept the config's objective
                pct(s["over_refusal"]),
                pct(s["did_task"]),
                pct(s["harmful_kept"]),
                f"{s['kl_benign']:.3f}",
                "passed" if s["gate_passed"] else "failed",
            ]
        )
    return rows


def rich_trials(report: dict) -> Table:
    table = Table(title="refcal tune: trials on the validation half")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "trial" else "right")
    for row in trial_rows(report):
        table.add_row(*row)
    return table


def pareto_plot(report: dict, path: Path) -> Path:
    """Over-refusal (x, lower is better) against the harmful refusal kept (y: the worst gate measure's safe
    share after over before): trials the gate passed as dots, failed ones as crosses, the chosen one starred."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for passed, marker, label in ((True, "o", "gate passed"), (False, "x", "gate failed")):
        chosen = [
            t
            for t in report["trials"]
            if t["scores"]["gate_passed"] is passed and t["scores"]["harmful_kept"] is not None
        ]
        axis.scatter([t["scores"]["over_refusal"] for t in chosen], [t["scores"]["harmful_kept"] for t in chosen],
                     marker=marker, label=label)  # fmt: skip
    best = [t for t in report["trials"] if t["number"] == report["chosen"]]
    if best and best[0]["scores"]["harmful_kept"] is not None:
        s = best[0]["scores"]
        axis.scatter(
            [s["over_refusal"]], [s["harmful_kept"]], marker="*", s=250, color="gold", edgecolor="black", label="chosen"
        )
    axis.set(xlabel="over-refusal, calibrated tasks (validation)", ylabel="harmful refusal kept (worst measure)",
             title="refcal tune: trials", xlim=(-0.02, 1.02))  # fmt: skip
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
