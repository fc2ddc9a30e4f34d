"""Refusal geometry on a frozen model: the global harmful direction and per-task over-refusal subspaces.

- r (per layer) = mean(h | harmful, refused) - mean(h | benign, answered)   (Arditi et al. 2024)
- U_t (per layer, per task) = principal directions of (h - m_t) over task t's over-refused rows, with
  the r component projected out first; m_t is the task's answered (benign) mean. The rank is the
  smallest that explains `variance` of that offset energy, capped at `max_rank`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from refcal.calibration.infra.artifacts import atomic_save_tensors, atomic_write_text
from refcal.calibration.infra.errors import UserError
from refcal.calibration.kinds import BENIGN, HARMFUL, OVER_REFUSAL


class FingerprintMismatch(UserError, ValueError):
    pass


class GeometryError(UserError, ValueError):
    """The rows cannot give the geometry asked for (a missing group, a degenerate subspace)."""


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def harmful_direction(harmful: torch.Tensor, answered: torch.Tensor) -> torch.Tensor:
    """Difference in means, per layer: [n, L, d] x [m, L, d] -> [L, d]."""
    if len(harmful) == 0 or len(answered) == 0:
        raise GeometryError(
            f"the harmful direction needs refused harmful rows and answered benign rows; the model refused "
            f"{len(harmful)} harmful and answered {len(answered)} benign training rows (does it refuse harmful requests at all?)"
        )
    return harmful.mean(0) - answered.mean(0)


def task_subspace(
    over_refused: torch.Tensor, answered_mean: torch.Tensor, direction: torch.Tensor, max_rank: int, variance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer: offsets [n, d] from the answered mean, orthogonal to `direction`, to an orthonormal basis [k, d].

    Returns the basis and the explained-variance ratios of all components (for reporting).
    """
    offsets = over_refused - answered_mean
    if not torch.isfinite(offsets).all():
        raise GeometryError("over-refusal offsets are not finite (NaN or inf in activations or the answered mean)")
    r = unit(direction)
    offsets = offsets - (offsets @ r)[:, None] * r
    # Uncentred PCA: the mean offset (the task's over-refusal direction) is part of the subspace.
    _, singular, vh = torch.linalg.svd(offsets, full_matrices=False)
    energy = singular**2
    total = energy.sum()
    if not torch.isfinite(total) or total <= 1e-12:
        raise GeometryError("over-refusal offsets have zero variance (identical or degenerate activations)")
    ratios = energy / total
    rank = int((torch.cumsum(ratios, 0) < variance).sum().item()) + 1
    rank = max(1, min(rank, max_rank, len(offsets)))
    return vh[:rank].contiguous(), ratios


@dataclass
class Geometry:
    """The geometry artifact: directions and subspaces at every layer, tagged with the model fingerprint."""

    fingerprint: str
    harmful: torch.Tensor  # [L, d], unnormalised difference in means
    subspaces: dict[str, list[torch.Tensor]]  # task -> per layer [k, d]
    answered_means: dict[str, torch.Tensor]  # task -> [L, d]
    layer: int  # the causally chosen layer
    info: dict = field(default_factory=dict)  # layer scores, ranks, counts, settings

    def direction(self, layer: int) -> torch.Tensor:
        return unit(self.harmful[layer])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"harmful": self.harmful.contiguous()}
        for task, bases in self.subspaces.items():
            tensors[f"answered_mean.{task}"] = self.answered_means[task].contiguous()
            for layer, basis in enumerate(bases):
                tensors[f"subspace.{task}.{layer}"] = basis.contiguous()
        meta = {"fingerprint": self.fingerprint, "layer": self.layer, "tasks": sorted(self.subspaces), **self.info}
        atomic_save_tensors(tensors, directory / "geometry.safetensors")
        atomic_write_text(directory / "geometry.json", json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, expected_fingerprint: str | None = None) -> Geometry:
        directory = Path(directory)
        meta = json.loads((directory / "geometry.json").read_text())
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise FingerprintMismatch(
                f"{directory} was measured on model {meta['fingerprint']}, not on this model ({expected_fingerprint})"
            )
        tensors = load_file(directory / "geometry.safetensors")
        harmful = tensors["harmful"]
        subspaces = {t: [tensors[f"subspace.{t}.{layer}"] for layer in range(len(harmful))] for t in meta["tasks"]}
        means = {t: tensors[f"answered_mean.{t}"] for t in meta["tasks"]}
        info = {k: v for k, v in meta.items() if k not in ("fingerprint", "layer", "tasks")}
        return cls(meta["fingerprint"], harmful, subspaces, means, meta["layer"], info)


def estimate(
    activations: torch.Tensor,
    kinds: list[str],
    tasks: list[str],
    refused: list[bool],
    fingerprint: str,
    max_rank: int = 4,
    variance: float = 0.6,
    raw_task: str = "none",
) -> Geometry:
    """Directions and subspaces at every layer from last-token activations [n, L, d] of labelled rows.

    Groups follow behaviour: harmful rows the model refused, benign rows it answered, and per task the
    over_refusal rows it refused. A task with no answered benign rows of its own uses the raw benign mean.
    """
    n, num_layers, _ = activations.shape
    if not (len(kinds) == len(tasks) == len(refused) == n):
        raise ValueError("activations, kinds, tasks and refused must have one entry per row")
    pick = lambda cond: torch.tensor([i for i in range(n) if cond(i)], dtype=torch.long)  # noqa: E731
    harmful_refused = pick(lambda i: kinds[i] == HARMFUL and refused[i])
    benign_answered = pick(lambda i: kinds[i] == BENIGN and not refused[i])
    raw_answered = pick(lambda i: kinds[i] == BENIGN and not refused[i] and tasks[i] == raw_task)
    harmful = harmful_direction(activations[harmful_refused], activations[benign_answered])

    subspaces, means, ranks, counts = {}, {}, {}, {}
    for task in sorted({t for t, k in zip(tasks, kinds) if k == OVER_REFUSAL}):
        over = pick(lambda i: kinds[i] == OVER_REFUSAL and tasks[i] == task and refused[i])
        answered = pick(lambda i: kinds[i] == BENIGN and tasks[i] == task and not refused[i])
        counts[task] = {"over_refused": len(over), "answered": len(answered)}
        if len(over) < 2:
            continue  # nothing to collapse: the model does not over-refuse this task
        base = answered if len(answered) else raw_answered
        if len(base) == 0:
            raise GeometryError(
                f"task {task!r}: the model answered none of its benign rows and none of the raw benign rows, "
                "so the answered mean its subspace is measured from does not exist"
            )
        means[task] = activations[base].mean(0)
        subspaces[task], ranks[task] = [], []
        for layer in range(num_layers):
            try:
                basis, _ = task_subspace(
                    activations[over, layer], means[task][layer], harmful[layer], max_rank, variance
                )
            except GeometryError as error:
                raise GeometryError(f"task {task!r}, layer {layer}: {error}") from error
            subspaces[task].append(basis)
            ranks[task].append(len(basis))
    info = {
        "groups": {"harmful_refused": len(harmful_refused), "benign_answered": len(benign_answered), "tasks": counts},
        "ranks": ranks,
        "max_rank": max_rank,
        "variance": variance,
    }
    return Geometry(fingerprint, harmful, subspaces, means, layer=-1, info=info)
