"""The inference-time interventions refcal is compared with, built from the frozen model's labelled
last-token activations (the geometry stage's cache), so they see the same rows refcal trains on.

- global ablation (Arditi et al. 2024): project r̂, the chosen layer's harmful direction, out of the
  residual stream at every layer and position;
- false-refusal ablation (Wang et al. 2024): v = mean(over_refusal, refused) - mean(benign, answered) at
  the chosen layer, partially orthogonalised against r̂ (coefficient c), then ablated the same way;
- task-conditioned steering (after SafeConstellations): a prompt is routed to the nearest task centroid
  at a routing layer; a prompt in a calibrated task's cluster gets that task's over-refusal direction,
  mean(over_refusal of t, refused) - m_t, subtracted from the chosen layers' outputs. Prompts routed
  anywhere else run unchanged.

Each intervention routes prompts into groups, each with the hook context it runs under, so generation
and KL can batch a group at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refcal.calibration.activations import capture_last_token
from refcal.calibration.geometry.directions import Geometry, unit
from refcal.calibration.geometry.interventions import ablate_directions, orthogonalise, subtract_vectors
from refcal.calibration.kinds import BENIGN, OVER_REFUSAL

UNSTEERED = "unsteered"


@dataclass
class Group:
    """Prompts (by index) that run under one hook context; `context(model)` applies it to a model."""

    label: str
    indices: list[int]
    context: Callable[[PreTrainedModel], AbstractContextManager]


@dataclass
class DirectionAblation:
    name: str
    direction: torch.Tensor  # [d]
    settings: dict = field(default_factory=dict)

    def groups(self, model, tokenizer, prompts: list[str], batch_size: int) -> list[Group]:
        return [Group("all", list(range(len(prompts))), lambda m: ablate_directions(m, self.direction))]


@dataclass
class TaskSteering:
    name: str
    route_layer: int
    centroids: dict[str, torch.Tensor]  # task cluster -> [d] at route_layer
    vectors: dict[str, dict[int, torch.Tensor]]  # steered task -> layer -> [d]
    scale: float = 1.0
    settings: dict = field(default_factory=dict)

    def route(self, activations: torch.Tensor) -> list[str]:
        """Nearest centroid (Euclidean) of each row of [n, d]."""
        names = sorted(self.centroids)
        centres = torch.stack([self.centroids[t] for t in names]).to(activations)
        return [names[i] for i in torch.cdist(activations, centres).argmin(1).tolist()]

    def groups(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], batch_size: int
    ) -> list[Group]:
        activations = capture_last_token(model, tokenizer, prompts, [self.route_layer], batch_size, progress=False)
        routes = self.route(activations[:, 0])
        by_label: dict[str, list[int]] = {}
        for i, task in enumerate(routes):
            by_label.setdefault(task if task in self.vectors else UNSTEERED, []).append(i)
        return [Group(label, indices, self._context(label)) for label, indices in sorted(by_label.items())]

    def _context(self, label: str) -> Callable[[PreTrainedModel], AbstractContextManager]:
        if label == UNSTEERED:
            return lambda m: nullcontext()
        return lambda m: subtract_vectors(m, self.vectors[label], self.scale)


def over_refusal_direction(
    activations: torch.Tensor, kinds: list[str], tasks: list[str], refused: list[bool], layer: int, calibrate: set[str]
) -> torch.Tensor:
    """Wang et al.'s false-refusal vector at one layer, from the calibrated tasks' over-refused rows."""
    over = [i for i in range(len(kinds)) if kinds[i] == OVER_REFUSAL and tasks[i] in calibrate and refused[i]]
    answered = [i for i in range(len(kinds)) if kinds[i] == BENIGN and not refused[i]]
    if len(over) < 2 or len(answered) < 2:
        raise ValueError(
            f"false-refusal vector needs over-refused and answered rows; got {len(over)} and {len(answered)}"
        )
    return activations[over, layer].mean(0) - activations[answered, layer].mean(0)


def task_steering(
    activations: torch.Tensor,
    tasks: list[str],
    kinds: list[str],
    refused: list[bool],
    geometry: Geometry,
    calibrate: set[str],
    layers: list[int],
    route_layer: int,
    scale: float,
) -> TaskSteering:
    """Centroids of every task cluster (all its rows) at the routing layer; steering vectors for the
    calibrated tasks the model over-refuses (those with an answered mean in the geometry artifact)."""
    centroids = {
        task: activations[[i for i, t in enumerate(tasks) if t == task], route_layer].mean(0)
        for task in sorted(set(tasks))
    }
    vectors = {}
    for task in sorted(calibrate & set(geometry.answered_means)):
        over = [i for i in range(len(kinds)) if kinds[i] == OVER_REFUSAL and tasks[i] == task and refused[i]]
        vectors[task] = {
            layer: activations[over, layer].mean(0) - geometry.answered_means[task][layer] for layer in layers
        }
    settings = {"layers": layers, "route_layer": route_layer, "scale": scale, "steered_tasks": sorted(vectors)}
    return TaskSteering("task_steering", route_layer, centroids, vectors, scale, settings)


def build_baselines(
    activations: torch.Tensor,
    kinds: list[str],
    tasks: list[str],
    refused: list[bool],
    geometry: Geometry,
    calibrate: list[str],
    coefficients: list[float],
    steering_layers: list[int],
    route_layer: int,
    steering_scale: float,
) -> list:
    """Every baseline, at the geometry's chosen layer; one false-refusal ablation per coefficient."""
    layer, calibrate_set = geometry.layer, set(calibrate)
    r = geometry.direction(layer)
    baselines: list = [DirectionAblation("global_ablation", r, {"layer": layer})]
    v = over_refusal_direction(activations, kinds, tasks, refused, layer, calibrate_set)
    for c in coefficients:
        ablated = unit(orthogonalise(v, r, c))
        settings = {"layer": layer, "orthogonalisation": c, "cosine_with_harmful": round(float(ablated @ r), 4)}
        baselines.append(DirectionAblation(f"false_refusal_ablation_c{c:g}", ablated, settings))
    baselines.append(
        task_steering(
            activations, tasks, kinds, refused, geometry, calibrate_set, steering_layers, route_layer, steering_scale
        )
    )
    return baselines
