"""Inference-time interventions: directional ablation at every layer and position (Arditi et al. 2024)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from calibration.models import decoder_layers


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
