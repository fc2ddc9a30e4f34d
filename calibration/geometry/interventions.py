"""Inference-time interventions: directional ablation at every layer and position (Arditi et al. 2024),
partial orthogonalisation of a vector against a direction (Wang et al. 2024), and activation subtraction."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from refcal.calibration.models import decoder_layers


def project_out(hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the span of `basis` ([k, d], orthonormal rows) from the last dimension of `hidden`."""
    basis = basis.to(hidden.dtype)
    return hidden - (hidden @ basis.T) @ basis


@contextmanager
def ablate_directions(model: PreTrainedModel, basis: torch.Tensor):
    """Project `basis` out of the residual stream entering every decoder layer and the final norm.

    Every component writes into the residual stream, so projecting it at each block's input (and before
    the final norm) removes the directions from everything downstream, at every position.
    """
    device = next(model.parameters()).device
    basis = torch.as_tensor(basis, dtype=torch.float32, device=device)
    basis = basis.reshape(-1, basis.shape[-1])
    basis = torch.linalg.qr(basis.T).Q.T  # orthonormal rows

    def pre_hook(_module, args, kwargs):
        if args:
            return (project_out(args[0], basis), *args[1:]), kwargs
        key = "hidden_states"
        kwargs[key] = project_out(kwargs[key], basis)
        return args, kwargs

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = list(decoder_layers(model)) + [base.model.norm]
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in targets]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def orthogonalise(vector: torch.Tensor, direction: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """Partial orthogonalisation (Wang et al. 2024): v - c (v . r̂) r̂. c = 1 removes all of r̂'s component,
    c = 0 leaves v as it is; values between keep part of the harmful direction in what gets ablated."""
    r = direction / direction.norm().clamp_min(1e-12)
    return vector - coefficient * (vector @ r) * r


@contextmanager
def subtract_vectors(model: PreTrainedModel, vectors: dict[int, torch.Tensor], scale: float = 1.0):
    """Activation subtraction: remove `scale * vectors[l]` from decoder layer l's output at every position
    (the prompt and each generated token), the negative of Arditi et al.'s activation addition."""
    device = next(model.parameters()).device
    blocks = decoder_layers(model)

    def hook_for(vector: torch.Tensor):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            shifted = hidden - scale * vector.to(device=hidden.device, dtype=hidden.dtype)
            return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(v.to(device))) for layer, v in vectors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
