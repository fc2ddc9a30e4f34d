"""train/losses/regularizer.py: the keep, collapse and retain terms and the GeometryRegularizer module."""

from __future__ import annotations

import pytest
import torch

from refcal.train.losses.regularizer import GeometryRegularizer, collapse_ratio, keep_violation, retain_drift


def test_keep_violation_zero_at_reference():
    reference = torch.tensor([[1.0, 2.0], [-0.5, 0.3]])
    keep_up = torch.tensor([[True], [False]])
    assert torch.equal(keep_violation(reference.clone(), reference, keep_up, 2.0), torch.zeros(2, 2))


def test_keep_violation_one_sided():
    reference = torch.tensor([[1.0], [1.0]])
    keep_up = torch.tensor([[True], [False]])  # row 0 harmful, row 1 benign
    gap = torch.tensor([0.5])
    # harmful falls below, benign rises above: both violate, squared in units of the gap
    bad = keep_violation(torch.tensor([[0.5], [1.25]]), reference, keep_up, gap)
    assert torch.allclose(bad, torch.tensor([[1.0], [0.25]]))
    assert (bad > 0).all()
    # harmful rises, benign falls: the allowed directions cost nothing
    good = keep_violation(torch.tensor([[3.0], [-2.0]]), reference, keep_up, gap)
    assert torch.equal(good, torch.zeros(2, 1))


def test_collapse_ratio_zero_at_answered_mean_and_one_at_reference():
    torch.manual_seed(0)
    d, k, b = 8, 2, 3
    basis = torch.linalg.qr(torch.randn(d, k)).Q.T.expand(b, k, d)
    mean = torch.randn(b, d)
    reference_hidden = torch.randn(b, d)
    energy = torch.einsum("bd,bkd->bk", reference_hidden - mean, basis).pow(2).sum(-1)
    assert torch.allclose(collapse_ratio(mean.clone(), mean, basis, energy), torch.zeros(b))
    assert torch.allclose(collapse_ratio(reference_hidden, mean, basis, energy), torch.ones(b))
    # moving orthogonally to the subspace changes nothing; moving inside it does
    orthogonal = torch.randn(b, d)
    orthogonal = orthogonal - torch.einsum("bd,bkd->bk", orthogonal, basis).unsqueeze(-1).mul(basis).sum(1)
    assert torch.allclose(collapse_ratio(reference_hidden + orthogonal, mean, basis, energy), torch.ones(b), atol=1e-5)
    assert (collapse_ratio(reference_hidden + 3 * basis[:, 0], mean, basis, energy) != 1).all()


def test_retain_drift():
    reference = torch.randn(4, 16)
    assert torch.equal(retain_drift(reference.clone(), reference, 2.0), torch.zeros(4))
    moved = reference + torch.tensor([1.0] + [0.0] * 15)
    assert torch.allclose(retain_drift(moved, reference, 2.0), torch.full((4,), 0.5))


def synthetic_regularizer(seed: int = 0, d: int = 16, layers=(1, 3)):
    """Harmful rows project far above benign ones on r; two tasks with rank-2 bases (one zero-padded)."""
    g = torch.Generator().manual_seed(seed)
    n_layers = len(layers)
    directions = torch.nn.functional.normalize(torch.randn(n_layers, d, generator=g), dim=-1)
    kinds = ["harmful", "harmful", "benign", "benign", "over_refusal", "over_refusal", "frame_attack", "benign"]
    tasks = ["none", "none", "none", "none", "sentiment", "cipher", "sentiment", "sentiment"]
    reference = torch.randn(len(kinds), n_layers, d, generator=g)
    for i, kind in enumerate(kinds):
        reference[i] += (4.0 if kind in ("harmful", "frame_attack") else -1.0) * directions
    bases, means = {}, {}
    for task in ("sentiment", "cipher"):
        q = torch.stack([torch.linalg.qr(torch.randn(d, 2, generator=g)).Q.T for _ in layers])
        if task == "cipher":
            q[:, 1] = 0  # zero-padded row
        bases[task] = q
        means[task] = torch.randn(n_layers, d, generator=g)
    collapse_rows = [k == "over_refusal" for k in kinds]
    module = GeometryRegularizer(list(layers), directions, reference, kinds, tasks, collapse_rows, bases, means)
    return module, reference, kinds


def test_regularizer_built_from_synthetic_tensors():
    module, reference, kinds = synthetic_regularizer()
    assert module.layers == [1, 3]
    assert module.task_names == ["cipher", "sentiment"]
    assert module.reference_hidden.shape == reference.shape
    assert (module.gap > 0).all()
    assert module.collapse_task.tolist() == [-1, -1, -1, -1, 1, 0, -1, -1]
    assert module.bases.shape == (2, 2, 2, 16)
    assert (module.reference_energy[4:6] > 0).all()


def test_forward_at_reference_is_keep0_collapse1_retain0():
    module, reference, kinds = synthetic_regularizer()
    rows = torch.arange(len(kinds))
    terms = module(module.reference_hidden.clone(), rows)
    keep_sum, keep_count = terms["keep"]
    collapse_sum, collapse_count = terms["collapse"]
    retain_sum, retain_count = terms["retain"]
    assert keep_count.item() == len(kinds)
    assert abs(keep_sum.item()) < 1e-10
    assert collapse_count.item() == 2
    assert collapse_sum.item() / collapse_count.item() == pytest.approx(1.0, abs=1e-5)
    assert retain_count.item() == 3
    assert abs(retain_sum.item()) < 1e-10


def test_forward_on_a_subset_and_after_moving():
    module, reference, kinds = synthetic_regularizer()
    rows = torch.tensor([0, 2, 4])  # harmful, benign, over_refusal
    hidden = module.reference_hidden[rows].clone()
    hidden[0] -= 2.0 * module.directions  # the harmful row stops projecting on r
    hidden[2] = module.answered_means[1]  # the over_refusal row sits at its task's answered mean
    terms = module(hidden, rows)
    assert terms["keep"][0].item() > 0
    assert terms["collapse"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["retain"][0].item() == pytest.approx(0.0, abs=1e-10)
    # a batch with no collapse or benign rows gives zero counts but keeps the graph alive
    only_harmful = module(module.reference_hidden[[0, 1]].clone().requires_grad_(), torch.tensor([0, 1]))
    assert only_harmful["collapse"][1].item() == 0 and only_harmful["retain"][1].item() == 0
    assert only_harmful["collapse"][0].requires_grad


def test_regularizer_needs_a_positive_gap():
    module, reference, kinds = synthetic_regularizer()
    with pytest.raises(ValueError, match="do not project above"):
        GeometryRegularizer(
            [1, 3], -module.directions, reference, kinds, ["none"] * len(kinds), [False] * len(kinds), {}, {}
        )
    with pytest.raises(ValueError, match="harmful and benign"):
        GeometryRegularizer([1, 3], module.directions, reference[:2], kinds[:2], ["none"] * 2, [False] * 2, {}, {})


def test_guard_keep_holds_only_rows_that_must_stay_refused():
    """keep_down False: an over_refusal row rising on r costs nothing; a harmful row falling still does."""
    module, reference, kinds = synthetic_regularizer()
    guard = GeometryRegularizer(
        module.layers, module.directions, reference, kinds, ["none"] * len(kinds), [False] * len(kinds), {}, {},
        keep_down=False,
    )  # fmt: skip
    rows = torch.tensor([0, 2, 4])  # harmful, benign, over_refusal
    hidden = guard.reference_hidden[rows].clone()
    hidden[1:] += 3.0 * guard.directions  # the answered rows rise on r
    assert guard(hidden, rows)["keep"][0].item() == 0 and module(hidden, rows)["keep"][0].item() > 0
    assert guard.counts(rows)["keep"].item() == 1 and module.counts(rows)["keep"].item() == 3
    hidden[0] -= 2.0 * guard.directions  # the harmful row falls
    assert guard(hidden, rows)["keep"][0].item() > 0


def test_following_a_live_direction_keeps_each_rows_height_above_the_benign_mean():
    module, reference, kinds = synthetic_regularizer()
    frozen = module.reference_projection.clone()
    benign = torch.tensor([k == "benign" for k in kinds])
    module.follow(module.directions.clone(), frozen[benign].mean(0))
    assert torch.allclose(module.reference_projection, frozen, atol=1e-5)  # the same direction: nothing moves
    turned = torch.nn.functional.normalize(module.directions + 0.5 * torch.randn_like(module.directions), dim=-1)
    module.follow(turned, torch.tensor([2.0, -1.0]))
    assert torch.equal(module.directions, turned)
    expected = (frozen - frozen[benign].mean(0)) + torch.tensor([2.0, -1.0])
    assert torch.allclose(module.reference_projection, expected, atol=1e-5)
    # a harmful row is now judged on the live direction: at its live reference it costs nothing
    rows = torch.tensor([0])
    at_reference = module.reference_hidden[rows].clone()
    shift = module.reference_projection[0] - torch.einsum("ld,ld->l", at_reference[0], turned)
    at_reference[0] += shift[:, None] * turned
    assert module(at_reference, rows)["keep"][0].item() == pytest.approx(0.0, abs=1e-8)
    at_reference[0] -= turned  # falls on the live direction
    assert module(at_reference, rows)["keep"][0].item() > 0


def test_forward_and_counts_compute_only_the_terms_asked_for():
    """The trainer asks only for the terms in the loss; each equals the full forward's, and the masked sums
    equal sums over the rows each term selects."""
    module, reference, kinds = synthetic_regularizer()
    rows = torch.arange(len(kinds))
    hidden = module.reference_hidden + 0.3 * torch.randn(
        module.reference_hidden.shape, generator=torch.Generator().manual_seed(1)
    )
    full = module(hidden, rows)
    assert list(full) == ["keep", "collapse", "retain"]
    for term in full:
        only = module(hidden, rows, (term,))
        assert list(only) == [term] and torch.equal(only[term][0], full[term][0])
        assert list(module.counts(rows, (term,))) == [term]
    benign = torch.tensor([i for i, k in enumerate(kinds) if k == "benign"])
    drift = retain_drift(hidden[benign], module.reference_hidden[benign], module.spread).mean(-1).sum()
    assert torch.allclose(full["retain"][0], drift)
    collapse = torch.tensor([4, 5])  # the over_refusal rows, of tasks sentiment (1) and cipher (0)
    task = module.collapse_task[collapse]
    ratios = torch.stack(
        [
            collapse_ratio(hidden[collapse, j], module.answered_means[task, j], module.bases[task, j],
                           module.reference_energy[collapse, j])
            for j in range(2)
        ],
        -1,
    )  # fmt: skip
    assert torch.allclose(full["collapse"][0], ratios.mean(-1).sum())
    assert module(hidden, rows, ()) == {}
