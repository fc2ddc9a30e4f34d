"""LossWeights: the weight of each regularizing loss term, carried from the config to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, fields

GEOMETRY_TERMS = ("keep", "collapse", "retain")  # the geometry regularizer's, on captured hidden states
OUTPUT_TERMS = ("onset", "distill")  # on the logits at the last prompt token


@dataclass(frozen=True)
class LossWeights:
    """The weights of the geometry regularizer's terms (keep, collapse, retain) and of the output-side terms
    (onset: the refusal-onset term; distill: the self-distillation guard), each added to the trainer's own
    loss; a term at 0 is neither built nor run, so it is not logged either."""

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

    def active(self, terms: tuple[str, ...]) -> tuple[str, ...]:
        """The terms among `terms` with a non-zero weight, in their order: the only ones worth computing."""
        return tuple(term for term in terms if self.of(term))

    @property
    def uses_geometry(self) -> bool:
        """Whether any geometry term (keep, collapse, retain) is in the loss: else no regularizer is needed."""
        return bool(self.active(GEOMETRY_TERMS))
