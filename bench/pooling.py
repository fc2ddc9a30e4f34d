"""One refusal rate over several groups of prompts (tasks, kinds), from each group's rate and n as the eval
stage writes them: the pooled rate of bench.calibration_table, bench.calibration_variants and
bench.retrain_new_clusters."""

from __future__ import annotations

from refcal.calibration.evaluation import wilson_rate


def pooled(groups: list[dict], interval: bool = True) -> dict | None:
    """A group's count is its rate x n, rounded. A 95% Wilson entry ({"rate", "n", "ci95"}), or without the
    interval {"rate", "refused", "n"}; None when there is no group."""
    if not groups:
        return None
    refused, n = sum(round(g["rate"] * g["n"]) for g in groups), sum(g["n"] for g in groups)
    return wilson_rate(refused, n) if interval else {"rate": round(refused / n, 4), "refused": refused, "n": n}
