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
- The LM head projects only the positions that have a label, on a CPU too (`score_labelled_positions_only`).

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


def score_labelled_positions_only() -> None:
    """Have TRL's fused LM head project only the positions whose next token has a label, on a CPU as it does
    on CUDA and XPU. Elsewhere TRL projects every position, so that compilers that specialise on shapes
    (Neuron) see one tile shape per batch; eager CPU training recompiles nothing, and the unlabelled
    positions (every prompt token, and every token of a target-free row) are most of refcal's batches. The
    loss is the same and the gradients the same up to the matmul's blocking, which can follow the row count
    (on the demo's shapes the adapter came out bit for bit the same); a demo training step takes about 60%
    of the time. Process-wide and idempotent."""
    import trl.trainer.utils as trl_utils

    current = trl_utils._use_triton  # read there only to decide whether to drop the unlabelled positions
    if getattr(current, "labelled_only", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or current(device)

    compact.labelled_only = True
    trl_utils._use_triton = compact
