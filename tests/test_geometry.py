"""calibration.geometry on planted activations; Geometry artifacts; directional ablation on a tiny model."""

from __future__ import annotations

import pytest
import torch

from refcal.calibration.geometry.directions import FingerprintMismatch, Geometry, GeometryError, estimate

D, L = 32, 3
RANKS = {"sentiment": 2, "translation": 3}


def planted(seed: int = 0):
    """Harmful rows = benign + r (shared); over-refused rows of task t = benign mean + offsets in U_t (⊥ r)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(D, D, generator=g)).Q.T  # orthonormal rows
    r = q[0]
    subspaces = {"sentiment": q[1:3], "translation": q[3:6]}
    benign_mean = torch.randn(L, D, generator=g)
    noise = 0.01
    acts, kinds, tasks, refused = [], [], [], []

    def add(vector, kind, task, refuse):
        acts.append(vector + noise * torch.randn(L, D, generator=g))
        kinds.append(kind)
        tasks.append(task)
        refused.append(refuse)

    for _ in range(40):
        add(benign_mean + 5.0 * r, "harmful", "none", True)
        add(benign_mean.clone(), "benign", "none", False)
    for task, basis in subspaces.items():
        for _ in range(10):
            add(benign_mean.clone(), "benign", task, False)
        scales = torch.linspace(3.0, 1.5, len(basis))  # distinct, well separated singular values
        for _ in range(60):
            coefficients = torch.randn(len(basis), generator=g) * scales
            # a component along r, which estimate must project out of the subspace
            add(benign_mean + coefficients @ basis + 2.0 * r, "over_refusal", task, True)
        add(benign_mean + basis[0], "over_refusal", task, False)  # answered: ignored
    return torch.stack(acts), kinds, tasks, refused, r, subspaces


def principal_angle_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(a @ b.T)


@pytest.fixture(scope="module")
def estimated():
    acts, kinds, tasks, refused, r, subspaces = planted()
    geometry = estimate(acts, kinds, tasks, refused, "fp-planted", max_rank=6, variance=0.99)
    return geometry, r, subspaces


def test_harmful_direction_recovered(estimated):
    geometry, r, _ = estimated
    for layer in range(L):
        assert torch.dot(geometry.direction(layer), r).item() >= 0.99


def test_task_ranks_and_subspaces_recovered(estimated):
    geometry, r, subspaces = estimated
    assert geometry.info["ranks"] == {task: [RANKS[task]] * L for task in RANKS}
    for task, planted_basis in subspaces.items():
        for layer in range(L):
            basis = geometry.subspaces[task][layer]
            assert basis.shape == (RANKS[task], D)
            assert torch.allclose(basis @ basis.T, torch.eye(len(basis)), atol=1e-5)
            # every principal angle small (cosines near 1); the estimated r projected out exactly
            assert principal_angle_cosines(basis, planted_basis).min().item() >= 0.99
            assert (basis @ geometry.direction(layer)).abs().max().item() < 1e-5
            assert (basis @ r).abs().max().item() < 1e-2


def test_rank_capped_by_max_rank():
    acts, kinds, tasks, refused, _, _ = planted()
    geometry = estimate(acts, kinds, tasks, refused, "fp", max_rank=2, variance=0.99)
    assert geometry.info["ranks"]["translation"] == [2] * L
    assert geometry.info["ranks"]["sentiment"] == [2] * L


def test_save_load_round_trip(estimated, tmp_path):
    geometry, _, _ = estimated
    geometry.layer = 1
    geometry.save(tmp_path / "geometry")
    loaded = Geometry.load(tmp_path / "geometry", expected_fingerprint="fp-planted")
    assert loaded.fingerprint == "fp-planted" and loaded.layer == 1
    assert torch.equal(loaded.harmful, geometry.harmful)
    assert sorted(loaded.subspaces) == sorted(geometry.subspaces)
    for task in geometry.subspaces:
        assert torch.equal(loaded.answered_means[task], geometry.answered_means[task])
        for a, b in zip(loaded.subspaces[task], geometry.subspaces[task]):
            assert torch.equal(a, b)
    assert loaded.info["ranks"] == geometry.info["ranks"]


def test_load_with_another_fingerprint_raises(estimated, tmp_path):
    geometry, _, _ = estimated
    geometry.save(tmp_path / "g")
    with pytest.raises(FingerprintMismatch) as error:
        Geometry.load(tmp_path / "g", expected_fingerprint="0123456789abcdef")
    assert "fp-planted" in str(error.value) and "0123456789abcdef" in str(error.value)


def test_estimate_needs_both_groups():
    acts, kinds, tasks, refused, _, _ = planted()
    with pytest.raises(ValueError, match="refused harmful rows and answered benign rows"):
        estimate(acts, kinds, tasks, [False] * len(kinds), "fp")


def test_degenerate_subspace_names_the_task_and_layer():
    """Over-refused rows identical to their answered mean leave no offset to span a subspace."""
    acts, kinds, tasks, refused, _, _ = planted()
    task = next(t for t, k in zip(tasks, kinds) if k == "over_refusal")
    answered = [i for i, (k, t) in enumerate(zip(kinds, tasks)) if k == "benign" and t == task and not refused[i]]
    for i, (k, t) in enumerate(zip(kinds, tasks)):
        if k == "over_refusal" and t == task:
            acts[i] = acts[answered].mean(0)
    with pytest.raises(GeometryError, match=rf"task '{task}', layer 0: over-refusal offsets have zero variance"):
        estimate(acts, kinds, tasks, refused, "fp")


def _stream_inputs(model, tokenizer, prompts):
    """Last-token residual stream that each decoder block and the final norm read: [n, L + 1, d].

    Pre-hooks registered here run after any already registered (such as ablate_directions' own), so
    they see exactly what the modules consume.
    """
    from refcal.calibration.activations import chat_prompts, encode_left_padded
    from refcal.calibration.models import decoder_layers

    seen = {}
    targets = list(decoder_layers(model)) + [model.model.norm]

    def hook(index):
        def record(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = hidden[:, -1, :].detach().float()

        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(targets)]
    try:
        with torch.no_grad():
            model(**encode_left_padded(tokenizer, chat_prompts(tokenizer, prompts), "cpu"), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([seen[i] for i in range(len(targets))], dim=1)


def test_ablation_removes_direction_from_the_residual_stream(tiny_model_dir):
    from refcal.calibration.activations import capture_last_token
    from refcal.calibration.geometry.interventions import ablate_directions
    from refcal.calibration.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = ["What is the capital of France?", "Write a poem about rain, please.", "Hi"]
    before = capture_last_token(model, tokenizer, prompts, progress=False)  # [3, 4, 64]
    direction = before[:, 2].mean(0)  # a direction the stream really carries
    unit = direction / direction.norm()
    stream_before = _stream_inputs(model, tokenizer, prompts)
    assert (stream_before @ unit).abs()[:, 1:].min().item() > 1e-3
    with ablate_directions(model, direction):
        stream_after = _stream_inputs(model, tokenizer, prompts)
        after = capture_last_token(model, tokenizer, prompts, progress=False)
    # every block and the final norm read a stream with ~0 projection on the direction
    projections = (stream_after @ unit).abs()
    assert projections.shape == (3, 5)
    assert projections.max().item() < 1e-5 * stream_after.norm(dim=-1).max().item() + 1e-7
    # capture_last_token reads block outputs: a block's output feeds the next block's (ablated) input,
    # (or the final norm), so output l equals input l+1 once the direction is projected out of it
    cleaned = after - (after @ unit)[..., None] * unit
    assert torch.allclose(cleaned, stream_after[:, 1:], atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-4)  # the ablation changed the computation
    # hooks are removed on exit
    again = capture_last_token(model, tokenizer, prompts, progress=False)
    assert torch.allclose(again, before, atol=1e-6)
