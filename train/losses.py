"""LossWeights: the weight of each regularizing loss term, carried from the config to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LossWeights:
    """The weights of the geometry regularizer's terms (keep, collapse, retain) and of the output-side terms
    (onset: the refusal-onset term; distill: the self-distillation guard), each added to the trainer's own
    loss; 0 leaves a term logged but out of the loss."""

    keep: float = 0.0
    collapse: float = 0.0
    retain: float = 0.0
    onset: float = 0.0
    distill: float = 0.0

    def __post_init__(self):
        for term in fields(self):  # YAML and flags may give ints; the trainer multiplies tensors by these
            object.__setattr__(self, term.name, float(getattr(self, term.name)))

    def of(self, term: str) -> float:
        """The weight of a term the trainer computed, by its logged name."""
        return getattr(self, term)
