"""Training defaults chosen from the model and the machine, so that a small model trains fast wherever it
runs; a config or flag that sets one wins. Measurements: docs/speed.md.

- Padding-free batches (TRL's `padding_free`): a batch's rows laid end to end in one sequence, position ids
  restarting at each, instead of padded to the longest. refcal's rows differ in length (a harmful question
  is short, a task frame around a passage long), so a padded batch of 8 is about half padding, and a
  padding-free step takes half the time. Transformers keeps the rows apart (a block-diagonal causal mask
  from the position ids) in every model built on its own code; a model with code of its own
  (trust_remote_code) may not, so it keeps padded batches.
- Gradient checkpointing (TRL's default) recomputes every layer's forward in the backward pass to save
  activation memory. A model under a billion parameters has little to save and pays for it on every step;
  larger ones keep it.
- Precision: bf16 on an accelerator that has it, fp32 on a CPU (processes.device_defaults).

Batches stay random: length-grouped ones (`train_sampling_strategy: group_by_length`) hold one row kind
each, and the demo's organism trained that way refused 92% of benign prompts instead of 38%.
"""

from __future__ import annotations

SMALL_MODEL_PARAMETERS = 1_000_000_000


def speed_defaults(model_reference: str | None, trust_remote_code: bool = False) -> dict:
    from refcal.calibration.models import parameter_count

    defaults = {} if trust_remote_code else {"padding_free": True}
    parameters = parameter_count(model_reference) if model_reference else None
    if parameters is not None and parameters < SMALL_MODEL_PARAMETERS:
        defaults["gradient_checkpointing"] = False
    return defaults
