"""Linear probes and cluster separation on activations (scikit-learn).

A probe is PCA (at most 50 components), standardisation, then class-balanced logistic regression, as the
paper's probes are built, scored by balanced accuracy under stratified 5-fold cross-validation, with a
permutation test: the p-value is the share of label shuffles that score at least as well as the true
labels ((count + 1) / (permutations + 1), as scikit-learn computes it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedKFold, permutation_test_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@dataclass
class ProbeResult:
    balanced_accuracy: float
    chance: float  # balanced accuracy of a constant guess: 1 / number of classes
    p_value: float
    n: int
    classes: int
    folds: int

    def as_dict(self) -> dict:
        return asdict(self)


def probe(
    features: np.ndarray, labels: list, components: int = 50, folds: int = 5, permutations: int = 200, seed: int = 0
) -> ProbeResult:
    """Cross-validated balanced accuracy of PCA + logistic regression, with a permutation-test p-value."""
    x = np.asarray(features, dtype=np.float64)
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(y)
    if len(counts) < 2:
        raise ValueError(f"a probe needs at least two classes; got {len(counts)}")
    folds = min(folds, int(counts.min()))
    if folds < 2:
        raise ValueError(f"a probe needs at least two rows per class; the smallest class has {counts.min()}")
    train_rows = len(y) - int(np.ceil(len(y) / folds))
    components = max(1, min(components, x.shape[1], train_rows - 1))
    model = make_pipeline(
        PCA(n_components=components, random_state=seed),
        StandardScaler(),
        LogisticRegression(class_weight="balanced", max_iter=2000),
    )
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    score, _, p_value = permutation_test_score(
        model, x, y, cv=cv, scoring="balanced_accuracy", n_permutations=permutations, random_state=seed
    )
    return ProbeResult(float(score), 1.0 / len(counts), float(p_value), len(y), len(counts), folds)


def silhouette(features: np.ndarray, labels: list) -> float | None:
    """Mean silhouette (cosine distance) of the labelled clusters; None when fewer than two clusters."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2 or len(labels) <= len(np.unique(labels)):
        return None
    return float(silhouette_score(np.asarray(features, dtype=np.float64), labels, metric="cosine"))
