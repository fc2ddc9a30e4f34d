"""Refusal geometry measured the way arXiv 2603.27518 reports it, one layer at a time.

Groups follow the model's behaviour (judged responses), at one position (the last prompt token):
- global harmful direction: mean(harmful, refused) - mean(benign, answered), both on plain prompts
  (no task frame), as Arditi et al. (2024) take it;
- task t's harmful direction: mean(frame_attack rows of t, refused) - mean(rows of t, answered);
- task t's over-refusal direction: mean(over_refusal rows of t, refused) - mean(rows of t, answered);
- dimensionality of a refusal type: PCA of its refused rows taken relative to the contrast group (their
  task's answered mean), as the paper centres them, without re-centring, so a refusal that is one
  shared offset counts as one dimension; PC1's share of the energy and n80, the number of components
  that reach 80%.
"""

from __future__ import annotations

import itertools

import numpy as np

from refcal.calibration.kinds import BENIGN, FRAME_ATTACK, HARMFUL, OVER_REFUSAL

MIN_ROWS = 2  # fewest rows a group needs for a mean
RAW = "none"  # the task of plain, unframed prompts


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def dimensionality(offsets: np.ndarray, threshold: float = 0.8) -> dict:
    """PC1 share and the number of components that explain `threshold` of the offsets' energy."""
    energy = np.linalg.svd(offsets, compute_uv=False) ** 2
    total = energy.sum()
    if len(offsets) < 3 or total <= 1e-12 or not np.isfinite(total):
        return {"pc1_share": None, "n80": None, "n": len(offsets)}
    shares = energy / total
    n80 = int(np.searchsorted(np.cumsum(shares), threshold - 1e-9) + 1)
    return {"pc1_share": float(shares[0]), "n80": n80, "n": len(offsets)}


class Groups:
    """Row masks by kind, task and behaviour."""

    def __init__(self, kinds: list[str], tasks: list[str], refused: list[bool]):
        self.kinds, self.tasks, self.refused = np.asarray(kinds), np.asarray(tasks), np.asarray(refused, dtype=bool)
        self.frame_tasks = sorted({t for t, k in zip(tasks, kinds) if k in (OVER_REFUSAL, FRAME_ATTACK)})

    def mask(self, kind: str | None = None, task: str | None = None, refused: bool | None = None) -> np.ndarray:
        m = np.ones(len(self.kinds), dtype=bool)
        if kind is not None:
            m &= self.kinds == kind
        if task is not None:
            m &= self.tasks == task
        if refused is not None:
            m &= self.refused == refused
        return m

    def answered(self, task: str) -> np.ndarray:
        """Rows of the task the model answered: benign frames, and over_refusal rows it did not refuse."""
        return self.mask(task=task, refused=False) & np.isin(self.kinds, [BENIGN, OVER_REFUSAL])


def mean_difference(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    if a.sum() < MIN_ROWS or b.sum() < MIN_ROWS:
        return None
    return x[a].mean(0) - x[b].mean(0)


def layer_geometry(x: np.ndarray, groups: Groups) -> dict:
    """Directions, cosines and dimensionality at one layer; x is [n, d]."""
    g = groups
    harmful = mean_difference(x, g.mask(HARMFUL, RAW, True), g.mask(BENIGN, RAW, False))
    task_harmful, over = {}, {}
    for task in g.frame_tasks:
        answered = g.answered(task)
        direction = mean_difference(x, g.mask(FRAME_ATTACK, task, True), answered)
        if direction is not None:
            task_harmful[task] = direction
        direction = mean_difference(x, g.mask(OVER_REFUSAL, task, True), answered)
        if direction is not None:
            over[task] = direction

    result: dict = {
        "task_harmful_vs_global": {t: cosine(v, harmful) for t, v in task_harmful.items()}
        if harmful is not None
        else {},
        "over_refusal_vs_global": {t: cosine(v, harmful) for t, v in over.items()} if harmful is not None else {},
        "over_refusal_pairwise": {
            f"{a}|{b}": cosine(over[a], over[b]) for a, b in itertools.combinations(sorted(over), 2)
        },
    }
    result["dimensionality"] = {
        "over_refusal": dimensionality(_relative_to_task(x, g, OVER_REFUSAL)),
        "harmful_refusal": dimensionality(_relative_to_task(x, g, FRAME_ATTACK)),
    }
    return result


def _relative_to_task(x: np.ndarray, g: Groups, kind: str) -> np.ndarray:
    """Refused rows of `kind`, each minus its task's answered mean (tasks with too few answered rows are left out)."""
    parts = []
    for task in g.frame_tasks:
        rows, answered = g.mask(kind, task, True), g.answered(task)
        if rows.sum() and answered.sum() >= MIN_ROWS:
            parts.append(x[rows] - x[answered].mean(0))
    return np.concatenate(parts) if parts else np.zeros((0, x.shape[1]))
