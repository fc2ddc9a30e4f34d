"""The loss terms beside TRL's own loss, in one table. A term has one name from the config to the log: its
weight is the `<name>_weight` field, its module computes it, and its per-step mean is logged as
`loss/<name>`. Only the terms with a non-zero weight are built, hooked, run and logged."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LossTerm:
    name: str
    module: str  # where the term is computed
    reads: str  # "logits": the next-token logits at the last prompt token; "hidden": the regularizer's layers

    @property
    def weight_field(self) -> str:
        return f"{self.name}_weight"

    @property
    def metric(self) -> str:
        return f"loss/{self.name}"


LOSS_TERMS = (
    LossTerm("onset", "refcal.train.losses.onset", "logits"),
    LossTerm("distill", "refcal.train.losses.distill", "logits"),
    LossTerm("keep", "refcal.train.losses.regularizer", "hidden"),
    LossTerm("collapse", "refcal.train.losses.regularizer", "hidden"),
    LossTerm("retain", "refcal.train.losses.regularizer", "hidden"),
)
TERMS = {term.name: term for term in LOSS_TERMS}
GEOMETRY_TERMS = tuple(term.name for term in LOSS_TERMS if term.reads == "hidden")  # one regularizer for these
OUTPUT_TERMS = tuple(term.name for term in LOSS_TERMS if term.reads == "logits")


@dataclass(frozen=True)
class LossWeights:
    """Each term's weight, by name (the table's order is the logging order)."""

    onset: float = 0.0
    distill: float = 0.0
    keep: float = 0.0
    collapse: float = 0.0
    retain: float = 0.0

    def __post_init__(self):
        for term in fields(self):  # YAML and flags may give ints; the trainer multiplies tensors by these
            object.__setattr__(self, term.name, float(getattr(self, term.name)))

    @classmethod
    def from_config(cls, args) -> LossWeights:
        """The weights a config sets, read from each term's `<name>_weight` field."""
        return cls(**{term.name: getattr(args, term.weight_field) for term in LOSS_TERMS})

    def of(self, term: str) -> float:
        return getattr(self, term)

    def active(self, terms: tuple[str, ...] = tuple(TERMS)) -> tuple[str, ...]:
        """The terms among `terms` with a non-zero weight, in the table's order: the only ones built and run."""
        return tuple(term for term in terms if self.of(term))

    @property
    def uses_geometry(self) -> bool:
        """Whether any geometry term (keep, collapse, retain) is in the loss: else no regularizer is built."""
        return bool(self.active(GEOMETRY_TERMS))
