"""The geometry report: the paper's measurements per layer, plots, and a claims table (Markdown + PNG + JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from refcal.calibration.geometry.analysis import RAW, Groups, layer_geometry
from refcal.calibration.geometry.probes import probe, silhouette
from refcal.calibration.infra.artifacts import atomic_directory
from refcal.calibration.kinds import BENIGN, FRAME_ATTACK, HARMFUL, OVER_REFUSAL

# What arXiv 2603.27518 reports on Llama-3.1-8B-Instruct (docs/paper_methods.md), and the test this
# report applies to call a claim reproduced on another model.
PAPER = {
    "task_harmful_vs_global": "about 0.85 (0.835-0.858)",
    "over_refusal_pairwise": "about 0.56",
    "over_refusal_vs_global": "0.3-0.46 through the middle layers",
    "n80": "over-refusal 11 vs harmful 8",
    "type_probe": "about 1.0 from early layers",
    "task_silhouette": "peaks about 0.45 in the middle layers",
}


def analyse(
    activations: np.ndarray, kinds: list[str], tasks: list[str], refused: list[bool],
    probe_layers: list[int], permutations: int = 100, seed: int = 0,
) -> dict:  # fmt: skip
    """Per-layer geometry at every layer of activations [n, L, d]; probes at `probe_layers`."""
    groups = Groups(kinds, tasks, refused)
    framed = np.isin(groups.tasks, groups.frame_tasks)
    layers = {}
    for layer in range(activations.shape[1]):
        x = activations[:, layer]
        result = layer_geometry(x, groups)
        result["silhouette"] = {
            "task": silhouette(x[framed], groups.tasks[framed]),
            "refusal_within_task": {
                t: silhouette(x[groups.tasks == t], groups.refused[groups.tasks == t]) for t in groups.frame_tasks
            },
        }
        if layer in probe_layers:
            result["probes"] = layer_probes(x, groups, permutations, seed)
        layers[layer] = result
    return {
        "layers": layers,
        "groups": group_counts(groups),
        "probe_layers": probe_layers,
        "permutations": permutations,
    }


def layer_probes(x: np.ndarray, g: Groups, permutations: int, seed: int) -> dict:
    """Task identity, refusal behaviour, refusal type, and refusal type within one task (task held fixed)."""
    framed = np.isin(g.tasks, g.frame_tasks)
    over = g.mask(OVER_REFUSAL)
    refused_over = g.mask(OVER_REFUSAL, refused=True)
    refused_harmful = g.mask(HARMFUL, RAW, True)
    specs = {
        "task_identity": (framed, g.tasks),
        "refusal_behaviour": (over, g.refused.astype(str)),
        "refusal_type": (refused_over | refused_harmful, g.kinds),
    }
    # the paper's type probe compares framed over-refusals with unframed harmful prompts, so it can read
    # the frame; within one task both classes share the frame
    best = max(
        g.frame_tasks, key=lambda t: min(g.mask(OVER_REFUSAL, t, True).sum(), g.mask(FRAME_ATTACK, t, True).sum())
    )
    within = g.mask(OVER_REFUSAL, best, True) | g.mask(FRAME_ATTACK, best, True)
    specs[f"refusal_type_within_{best}"] = (within, g.kinds)
    out = {}
    for name, (rows, labels) in specs.items():
        try:
            out[name] = probe(x[rows], labels[rows], permutations=permutations, seed=seed).as_dict()
        except ValueError as error:
            out[name] = {"skipped": str(error)}
    return out


def group_counts(g: Groups) -> dict:
    counts = {
        "harmful_refused_raw": int(g.mask(HARMFUL, RAW, True).sum()),
        "benign_answered_raw": int(g.mask(BENIGN, RAW, False).sum()),
    }
    for t in g.frame_tasks:
        counts[t] = {
            "over_refused": int(g.mask(OVER_REFUSAL, t, True).sum()),
            "frame_attack_refused": int(g.mask(FRAME_ATTACK, t, True).sum()),
            "answered": int(g.answered(t).sum()),
        }
    return counts


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _mean_of(by_key: dict) -> float | None:
    return _mean(by_key.values())


def claims(analysis: dict, layer: int) -> list[dict]:
    """Each of the paper's claims, its number, this model's number at `layer` (middle layers where the
    paper says so), and whether it holds by the stated test."""
    layers = analysis["layers"]
    n = len(layers)
    middle = [layers[i] for i in range(n // 4, 3 * n // 4 + 1)]
    at = layers[layer]
    harmful_cos = _mean_of(at["task_harmful_vs_global"])
    pairwise = _mean_of(at["over_refusal_pairwise"])
    or_vs_harm = _mean(_mean_of(l["over_refusal_vs_global"]) for l in middle)
    dims = at["dimensionality"]
    n80_over, n80_harm = dims["over_refusal"]["n80"], dims["harmful_refusal"]["n80"]
    probe_layers = analysis["probe_layers"]
    early = [layers[i]["probes"] for i in probe_layers if i <= n // 3 and "probes" in layers[i]]
    type_early = _mean(p.get("refusal_type", {}).get("balanced_accuracy") for p in early)
    within_acc = _mean(
        v.get("balanced_accuracy") for p in early for k, v in p.items() if k.startswith("refusal_type_within_")
    )
    silhouettes = [layers[i]["silhouette"]["task"] for i in range(n)]
    best_sil = (
        max((s, i) for i, s in enumerate(silhouettes) if s is not None)
        if any(s is not None for s in silhouettes)
        else (None, None)
    )

    def row(claim, paper, here, holds, test):
        return {"claim": claim, "paper": paper, "this_model": here, "holds": holds, "test": test}

    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return [
        row("per-task harmful directions align with the global one", PAPER["task_harmful_vs_global"],
            fmt(harmful_cos), None if harmful_cos is None else harmful_cos >= 0.7, f"mean cosine at layer {layer} >= 0.7"),
        row("over-refusal directions differ between tasks", PAPER["over_refusal_pairwise"],
            fmt(pairwise), None if pairwise is None else pairwise < 0.8, f"mean pairwise cosine at layer {layer} < 0.8"),
        row("over-refusal is only partly aligned with harmful refusal", PAPER["over_refusal_vs_global"],
            fmt(or_vs_harm), None if or_vs_harm is None else 0.15 <= or_vs_harm <= 0.7, "middle-layer mean cosine in [0.15, 0.7]"),
        row("over-refusal spans more dimensions than harmful refusal", PAPER["n80"],
            f"{n80_over} vs {n80_harm}", None if None in (n80_over, n80_harm) else n80_over > n80_harm, f"n80 at layer {layer}"),
        row("refusal type is linearly decodable from early layers", PAPER["type_probe"],
            fmt(type_early), None if type_early is None else type_early >= 0.9, "balanced accuracy >= 0.9 in the first third"),
        row("... and still within one task (frame held fixed)", "not measured (the paper's probe may read the task)",
            fmt(within_acc), None if within_acc is None else within_acc >= 0.9, "same test, one task's rows only"),
        row("tasks form clusters", PAPER["task_silhouette"],
            f"{fmt(best_sil[0])} at layer {best_sil[1]}", None if best_sil[0] is None else best_sil[0] >= 0.2, "peak silhouette >= 0.2"),
    ]  # fmt: skip


def _series(analysis: dict, pick) -> tuple[list[int], list[float | None]]:
    layers = sorted(analysis["layers"])
    return layers, [pick(analysis["layers"][i]) for i in layers]


def _plot(path: Path, title: str, ylabel: str, lines: dict[str, tuple[list, list]], marker_layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys) in lines.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    axis.axvline(marker_layer, color="grey", linestyle=":", label=f"chosen layer {marker_layer}")
    axis.set(title=title, xlabel="layer", ylabel=ylabel)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(analysis: dict, layer: int, directory: str | Path, model: str) -> Path:
    """report.md, report.json and four PNG plots in `directory`, written atomically."""
    rows = claims(analysis, layer)
    with atomic_directory(directory) as staging:
        (staging / "report.json").write_text(
            json.dumps({"model": model, "layer": layer, "claims": rows, **analysis}, indent=2)
        )
        _plot(staging / "cosines.png", "direction cosines", "cosine", {
            "per-task harmful vs global": _series(analysis, lambda l: _mean_of(l["task_harmful_vs_global"])),
            "over-refusal pairwise": _series(analysis, lambda l: _mean_of(l["over_refusal_pairwise"])),
            "over-refusal vs global harmful": _series(analysis, lambda l: _mean_of(l["over_refusal_vs_global"])),
        }, layer)  # fmt: skip
        _plot(staging / "dimensionality.png", "components to reach 80% (n80)", "n80", {
            "over-refusal": _series(analysis, lambda l: l["dimensionality"]["over_refusal"]["n80"]),
            "harmful refusal": _series(analysis, lambda l: l["dimensionality"]["harmful_refusal"]["n80"]),
        }, layer)  # fmt: skip
        probe_names = sorted({k for i in analysis["probe_layers"] for k in analysis["layers"][i].get("probes", {})})
        _plot(staging / "probes.png", "linear probes (balanced accuracy, 5-fold CV)", "balanced accuracy", {
            name: (analysis["probe_layers"], [analysis["layers"][i]["probes"][name].get("balanced_accuracy") for i in analysis["probe_layers"]])
            for name in probe_names
        }, layer)  # fmt: skip
        _plot(staging / "silhouette.png", "silhouette (cosine distance)", "silhouette", {
            "task clusters": _series(analysis, lambda l: l["silhouette"]["task"]),
            "refused vs answered, mean over tasks": _series(analysis, lambda l: _mean_of(l["silhouette"]["refusal_within_task"])),
        }, layer)  # fmt: skip
        (staging / "report.md").write_text(markdown(analysis, rows, layer, model))
    return Path(directory)


def markdown(analysis: dict, rows: list[dict], layer: int, model: str) -> str:
    fmt = lambda v: "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"# Refusal geometry of {model}",
        "",
        "Last prompt token, every layer; groups follow the model's own (judged) responses. Definitions are in",
        "`calibration/geometry/analysis.py`; the paper's methods, as far as they could be read, in `docs/paper_methods.md`.",
        f"Chosen layer (by ablation, the pipeline's choice): {layer}. Group sizes: `{json.dumps(analysis['groups'])}`.",
        "",
        "## The paper's claims on this model",
        "",
        "| claim | paper (Llama-3.1-8B-Instruct) | this model | holds? | test |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        holds = "n/a" if r["holds"] is None else ("yes" if r["holds"] else "no")
        lines.append(f"| {r['claim']} | {r['paper']} | {r['this_model']} | {holds} | {r['test']} |")
    lines += [
        "",
        "## Per layer",
        "",
        "| layer | task harmful vs global | OR pairwise | OR vs global | n80 OR | n80 harmful | PC1 OR | PC1 harmful | task silhouette |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i in sorted(analysis["layers"]):
        l = analysis["layers"][i]  # noqa: E741
        d = l["dimensionality"]
        lines.append(
            f"| {i} | {fmt(_mean_of(l['task_harmful_vs_global']))} | {fmt(_mean_of(l['over_refusal_pairwise']))} | "
            f"{fmt(_mean_of(l['over_refusal_vs_global']))} | {fmt(d['over_refusal']['n80'])} | {fmt(d['harmful_refusal']['n80'])} | "
            f"{fmt(d['over_refusal']['pc1_share'])} | {fmt(d['harmful_refusal']['pc1_share'])} | {fmt(l['silhouette']['task'])} |"
        )
    lines += ["", f"## Probes ({analysis['permutations']} permutations; balanced accuracy, p)", ""]
    for i in analysis["probe_layers"]:
        probes = analysis["layers"][i].get("probes", {})
        cells = [
            f"{k}: {v['balanced_accuracy']:.2f} (p={v['p_value']:.3f}, n={v['n']})"
            if "balanced_accuracy" in v
            else f"{k}: skipped"
            for k, v in probes.items()
        ]
        lines.append(f"- layer {i}: " + "; ".join(cells))
    lines += [
        "",
        "![cosines](cosines.png)",
        "![dimensionality](dimensionality.png)",
        "![probes](probes.png)",
        "![silhouette](silhouette.png)",
        "",
    ]
    return "\n".join(lines)
