"""Refusal geometry on a frozen model: directions and subspaces, the paper's measurements, probes, layer choice, interventions."""
