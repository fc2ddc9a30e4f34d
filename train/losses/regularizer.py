"""The geometry regularizer: keep, collapse and retain, as plain torch functions plus one module.

All terms read the residual stream h at the last prompt token of chosen layers (or at each of the
prompt's last few tokens, the chat template's post-instruction tail: then every (row, position) is an
item with its own reference), against reference values cached from the frozen model (no second model in
memory):
- keep: harmful and frame_attack rows' projection on r must not fall below the reference; benign and
  over_refusal rows' projection must not rise above it. One-sided, divided by the reference gap
  between harmful and benign projections, squared. 0 when every projection is on its allowed side.
  As a guard (keep_down False) only the first half applies: holding answered rows down would pin them to
  the over-refusing states calibration has to leave. With a live direction (`follow`) r is re-estimated
  from the model being trained, and each row's reference becomes its frozen height above the benign mean
  (in gap units) above the live benign mean: the hold moves with the direction that carries refusal now.
- collapse: for over_refusal rows of task t, the energy of (h - m_t) inside U_t divided by its
  reference value: 1 = unchanged, 0 = sitting at the task's answered mean. Optionally U_t also holds
  r itself, so the harmful component of those rows collapses too.
- retain: benign rows' squared drift from their reference hidden state, divided by the reference
  spread of benign hidden states. 0 = unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from refcal.calibration.kinds import BENIGN, HARMFUL, KINDS, SHOULD_REFUSE
from refcal.train.losses.table import GEOMETRY_TERMS

KIND_CODES = {kind: code for code, kind in enumerate(KINDS)}
KEEP_UP = tuple(KIND_CODES[kind] for kind in SHOULD_REFUSE)  # must keep refusing


def keep_violation(
    projection: torch.Tensor, reference: torch.Tensor, keep_up: torch.Tensor, gap: torch.Tensor | float
) -> torch.Tensor:
    """Per row: squared one-sided shortfall of the projection on r, in units of the reference gap."""
    shortfall = torch.where(keep_up, reference - projection, projection - reference)
    return (torch.relu(shortfall) / gap) ** 2


def collapse_ratio(
    hidden: torch.Tensor, answered_mean: torch.Tensor, basis: torch.Tensor, reference_energy: torch.Tensor
) -> torch.Tensor:
    """Per row: energy of (h - m_t) inside the span of the row's basis, over its reference energy.

    hidden, answered_mean: [B, d]; basis: [B, k, d] with orthonormal (or zero) rows; reference_energy: [B].
    """
    coordinates = torch.einsum("bd,bkd->bk", hidden - answered_mean, basis)
    return coordinates.pow(2).sum(-1) / reference_energy.clamp_min(1e-8)


def retain_drift(hidden: torch.Tensor, reference: torch.Tensor, spread: float) -> torch.Tensor:
    """Per row: squared distance to the reference hidden state over the reference spread."""
    return (hidden - reference).pow(2).sum(-1) / spread


class GeometryRegularizer(nn.Module):
    """Reference values for every training row (indexed by row_index) at the regularizer's layers.

    Built once from the geometry artifact and the frozen model's cached activations of the training
    rows; in training it turns captured hidden states into per-term (sum, count) pairs. With references
    at several prompt tokens per row ([N, P, Lr, d]) each (row, position) is an item with its row's kind
    and task: row i's position k (k = 0 the earliest) is item i * P + k.
    """

    def __init__(
        self,
        layers: list[int],
        directions: torch.Tensor,  # [Lr, d] unit vectors r
        reference_hidden: torch.Tensor,  # [N, Lr, d] (or [N, P, Lr, d]) frozen-model activations of the training rows
        kinds: list[str],
        tasks: list[str],
        collapse_rows: list[bool],  # which rows the collapse term applies to
        bases: dict[str, torch.Tensor],  # task -> [Lr, k, d] (zero-padded rows are harmless)
        answered_means: dict[str, torch.Tensor],  # task -> [Lr, d]
        keep_down: bool = True,  # the keep term also holds benign and over_refusal rows below their reference
    ):
        super().__init__()
        self.layers = list(layers)
        self.keep_down = keep_down
        self.positions = reference_hidden.shape[1] if reference_hidden.dim() == 4 else 1  # prompt tokens per row
        if self.positions > 1:
            reference_hidden = reference_hidden.flatten(0, 1)
            kinds, tasks, collapse_rows = (
                [v for v in values for _ in range(self.positions)] for values in (kinds, tasks, collapse_rows)
            )
        self.task_names = sorted(bases)
        task_index = {t: i for i, t in enumerate(self.task_names)}
        self.register_buffer("directions", directions.float())
        self.register_buffer("reference_hidden", reference_hidden.float())
        self.register_buffer("kind", torch.tensor([KIND_CODES[k] for k in kinds]))
        # which items must keep refusing, once: a per-step lookup table would be a host-to-device copy
        self.register_buffer("keep_up", torch.isin(self.kind, torch.tensor(KEEP_UP)), persistent=False)
        collapse_task = [task_index[t] if c and t in task_index else -1 for t, c in zip(tasks, collapse_rows)]
        self.register_buffer("collapse_task", torch.tensor(collapse_task))
        rank = max((b.shape[1] for b in bases.values()), default=0)  # pad ranks with zero rows (they add nothing)
        padded = [
            torch.cat(
                [bases[t].float(), bases[t].new_zeros(len(layers), rank - bases[t].shape[1], bases[t].shape[2])], 1
            )
            for t in self.task_names
        ]
        self.register_buffer("bases", torch.stack(padded) if bases else torch.zeros(0))
        self.register_buffer(
            "answered_means",
            torch.stack([answered_means[t].float() for t in self.task_names]) if bases else torch.zeros(0),
        )
        reference_projection = torch.einsum("nld,ld->nl", self.reference_hidden, self.directions)
        self.register_buffer("reference_projection", reference_projection)
        harmful = self.kind == KIND_CODES[HARMFUL]
        benign = self.kind == KIND_CODES[BENIGN]
        if not harmful.any() or not benign.any():
            raise ValueError("the regularizer needs harmful and benign training rows for its reference gap")
        gap = reference_projection[harmful].mean(0) - reference_projection[benign].mean(0)
        if (gap <= 0).any():
            bad = [layers[i] for i in torch.nonzero(gap <= 0).flatten().tolist()]
            raise ValueError(f"harmful rows do not project above benign rows on r at layer(s) {bad}")
        self.register_buffer("gap", gap)
        # each item's frozen height above the benign mean on r, in gap units: what a live direction keeps
        self.register_buffer("height", (reference_projection - reference_projection[benign].mean(0)) / gap)
        benign_hidden = self.reference_hidden[benign]
        spread = (benign_hidden - benign_hidden.mean(0)).pow(2).sum(-1).mean(0)
        self.register_buffer("spread", spread.clamp_min(1e-8))
        energy = torch.ones(len(kinds), len(layers))
        rows = torch.nonzero(self.collapse_task >= 0).flatten()
        if len(rows):
            t = self.collapse_task[rows]
            offsets = self.reference_hidden[rows] - self.answered_means[t]
            energy[rows] = torch.einsum("rld,rlkd->rlk", offsets, self.bases[t]).pow(2).sum(-1)
        self.register_buffer("reference_energy", energy)

    @torch.no_grad()
    def follow(self, directions: torch.Tensor, benign_projection: torch.Tensor) -> None:
        """Move the keep term onto a live direction: `directions` [Lr, d] (unit) re-estimated from the model
        being trained, `benign_projection` [Lr] its benign rows' mean projection on them."""
        self.directions.copy_(directions)
        self.reference_projection.copy_(self.height * self.gap + benign_projection)

    def counts(self, row_index: torch.Tensor, terms: tuple[str, ...] = GEOMETRY_TERMS) -> dict[str, torch.Tensor]:
        """Items each of `terms` averages over, for these items: known before any forward pass, so the trainer
        can divide by a whole accumulation window's count."""
        return {term: self._applies(term, row_index).sum().float() for term in terms}

    def forward(
        self, hidden: torch.Tensor, row_index: torch.Tensor, terms: tuple[str, ...] = GEOMETRY_TERMS
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """hidden: [B, Lr, d] at the last prompt token. Returns term -> (sum over rows and layers, row count),
        for `terms` only. Rows a term does not apply to are masked, not selected: selecting by a mask would
        read its size back from the device, a sync in every step."""
        sums = {"keep": self._keep_sum, "collapse": self._collapse_sum, "retain": self._retain_sum}
        counts = self.counts(row_index, terms)
        return {term: (sums[term](hidden, row_index), counts[term]) for term in terms}

    def _applies(self, term: str, row_index: torch.Tensor) -> torch.Tensor:
        """Which of these items `term` acts on."""
        if term == "keep":
            return torch.ones_like(self.keep_up[row_index]) if self.keep_down else self.keep_up[row_index]
        if term == "collapse":
            return self.collapse_task[row_index] >= 0
        return self.kind[row_index] == KIND_CODES[BENIGN]

    def _keep_sum(self, hidden: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
        projection = torch.einsum("bld,ld->bl", hidden.float(), self.directions)
        keep_up = self.keep_up[row_index][:, None]
        keep = keep_violation(projection, self.reference_projection[row_index], keep_up, self.gap)
        if not self.keep_down:
            keep = keep * keep_up
        return keep.mean(-1).sum()

    def _collapse_sum(self, hidden: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
        if self.bases.numel() == 0:  # no task has a subspace: nothing collapses, but the graph stays whole
            return hidden.sum() * 0
        task = self.collapse_task[row_index].clamp_min(0)  # rows outside the term read task 0, then are masked
        ratios = torch.stack(
            [
                collapse_ratio(
                    hidden[:, j].float(),
                    self.answered_means[task, j],
                    self.bases[task, j],
                    self.reference_energy[row_index, j],
                )
                for j in range(len(self.layers))
            ],
            dim=-1,
        )
        return torch.where(self._applies("collapse", row_index), ratios.mean(-1), 0.0).sum()

    def _retain_sum(self, hidden: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
        drift = retain_drift(hidden.float(), self.reference_hidden[row_index], self.spread)
        return torch.where(self._applies("retain", row_index), drift.mean(-1), 0.0).sum()
