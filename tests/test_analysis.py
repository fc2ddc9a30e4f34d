"""Geometry analysis estimators on synthetic activations with a planted geometry, and probes on noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refcal.calibration.geometry.analysis import Groups, cosine, dimensionality, layer_geometry
from refcal.calibration.geometry.probes import probe, silhouette

D = 48
TASKS = ("sentiment", "translation", "cipher")


def planted(seed: int = 0):
    """A harmful direction r shared by every task; per task a centroid, an over-refusal direction o_t and
    a rank-k_t over-refusal subspace U_t (zero-mean coefficients), all orthogonal to r; small noise."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(D, D)))[0].T
    r = q[0]
    over_dirs = {t: q[1 + i] for i, t in enumerate(TASKS)}
    ranks = {"sentiment": 2, "translation": 3, "cipher": 4}
    start, subspaces = 4, {}
    for t in TASKS:
        subspaces[t] = q[start : start + ranks[t]]
        start += ranks[t]
    centroids = {t: 6.0 * rng.normal(size=D) for t in (*TASKS, "none")}
    rows, kinds, tasks, refused = [], [], [], []

    def add(vector, kind, task, refuse):
        rows.append(vector + 0.05 * rng.normal(size=D))
        kinds.append(kind)
        tasks.append(task)
        refused.append(refuse)

    for _ in range(40):
        add(centroids["none"] + 4.0 * r, "harmful", "none", True)
        add(centroids["none"].copy(), "benign", "none", False)
    for t in TASKS:
        for _ in range(30):
            add(centroids[t].copy(), "benign", t, False)
            add(centroids[t] + 4.0 * r, "frame_attack", t, True)
            add(centroids[t] + 3.0 * over_dirs[t] + rng.normal(size=ranks[t]) @ subspaces[t], "over_refusal", t, True)
    return np.stack(rows), Groups(kinds, tasks, refused), r, over_dirs, subspaces


@pytest.fixture(scope="module")
def data():
    return planted()


def test_directions_recover_the_planted_ones(data):
    x, groups, r, over_dirs, _ = data
    result = layer_geometry(x, groups)
    for task in TASKS:
        assert result["task_harmful_vs_global"][task] >= 0.99  # one task-agnostic harmful direction
        assert abs(result["over_refusal_vs_global"][task]) < 0.1  # planted orthogonal to r
    for pair, value in result["over_refusal_pairwise"].items():
        assert abs(value) < 0.1, pair  # planted orthogonal to each other


def test_over_refusal_direction_matches_the_planted_one(data):
    x, groups, _, over_dirs, _ = data
    for task in TASKS:
        answered = groups.answered(task)
        direction = x[groups.mask("over_refusal", task, True)].mean(0) - x[answered].mean(0)
        assert cosine(direction, over_dirs[task]) >= 0.99


@pytest.mark.parametrize("rank", [1, 2, 5, 10])
def test_dimensionality_of_a_planted_subspace(rank):
    rng = np.random.default_rng(rank)
    basis = np.linalg.qr(rng.normal(size=(D, rank)))[0].T
    rows = rng.normal(size=(4000, rank)) @ basis + 1e-3 * rng.normal(size=(4000, D))
    result = dimensionality(rows)
    assert result["n80"] == math.ceil(0.8 * rank - 0.05)  # equal variances: 80% needs ceil(0.8 k) components
    assert result["pc1_share"] == pytest.approx(1 / rank, abs=0.05)


def test_harmful_refusal_is_one_dimensional_and_over_refusal_is_not(data):
    x, groups, *_ = data
    dims = layer_geometry(x, groups)["dimensionality"]
    assert dims["harmful_refusal"]["n80"] == 1 and dims["harmful_refusal"]["pc1_share"] > 0.95  # one shared offset
    assert dims["over_refusal"]["n80"] > 3  # the tasks' own directions and subspaces


@pytest.mark.slow
def test_probe_finds_planted_labels(data):
    x, groups, *_ = data
    framed = np.isin(groups.kinds, ["benign", "frame_attack", "over_refusal"]) & (groups.tasks != "none")
    task_probe = probe(x[framed], groups.tasks[framed], components=8, permutations=20)
    assert task_probe.balanced_accuracy >= 0.95 and task_probe.p_value <= 1 / 21 + 1e-9
    kind = np.isin(groups.kinds, ["frame_attack", "over_refusal"])
    type_probe = probe(x[kind], groups.kinds[kind], components=8, permutations=20)
    assert type_probe.balanced_accuracy >= 0.95


@pytest.mark.slow
def test_probe_on_pure_noise_stays_at_chance():
    significant, scores = 0, []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        result = probe(rng.normal(size=(80, D)), rng.integers(0, 2, size=80), components=8, permutations=30, seed=seed)
        scores.append(result.balanced_accuracy)
        significant += result.p_value < 0.05
    assert abs(np.mean(scores) - 0.5) < 0.06
    assert significant <= 2  # about 5% of null probes may pass by chance; 8 draws


def test_silhouette_of_planted_clusters_and_of_noise(data):
    x, groups, *_ = data
    benign = groups.mask("benign") & (groups.tasks != "none")
    assert silhouette(x[benign], groups.tasks[benign]) > 0.5
    rng = np.random.default_rng(0)
    assert abs(silhouette(rng.normal(size=(200, D)), rng.integers(0, 3, size=200))) < 0.05
    assert silhouette(x[:5], ["a"] * 5) is None


def test_probe_needs_two_rows_per_class():
    with pytest.raises(ValueError, match="two rows per class"):
        probe(np.zeros((5, 3)), [0, 0, 0, 0, 1])


@pytest.mark.slow
def test_report_on_planted_geometry(data, tmp_path):
    """analyse + write_report over a stack of layers: files written, and the planted claims hold."""
    from refcal.train.reports.geometry_page import analyse, write_report

    x, groups, *_ = data
    rng = np.random.default_rng(1)
    noise_layer = rng.normal(size=x.shape)  # a layer with no geometry at all
    activations = np.stack([noise_layer, x, x, x], axis=1)
    analysis = analyse(
        activations, list(groups.kinds), list(groups.tasks), list(groups.refused), [0, 1, 2], permutations=10
    )
    out = write_report(analysis, 2, tmp_path / "report", "planted")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "report.json", "cosines.png", "dimensionality.png", "probes.png", "silhouette.png"]
    )
    claims = {row["claim"]: row["holds"] for row in json.loads((out / "report.json").read_text())["claims"]}
    assert claims["per-task harmful directions align with the global one"] is True
    assert claims["over-refusal directions differ between tasks"] is True
    assert claims["over-refusal spans more dimensions than harmful refusal"] is True
    assert claims["over-refusal is only partly aligned with harmful refusal"] is False  # planted orthogonal
    noise_probe = analysis["layers"][0]["probes"]["task_identity"]
    assert noise_probe["balanced_accuracy"] < 0.6  # the noise layer carries no task
    assert "| claim |" in (out / "report.md").read_text()
