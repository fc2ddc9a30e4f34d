"""A sentinel for models that run off the run's device.

Every model refcal loads goes through `AutoModelForCausalLM.from_pretrained`; the sentinel marks those loaded
straight onto the process's device (Accelerate's state) and records every inference forward (grad off) of a
model that was not. On a machine without an accelerator everything is on the CPU anyway, so the mark is
what tells a stage that loads its model without a device, and would leave it on the CPU beside a GPU.
Training forwards (grad on) belong to the Trainer, which places its model itself.

In-process: `with device_sentinel() as strays: ...`. As a command, `python tests/device_sentinel.py OUT
REFCAL_ARGS...` runs `refcal REFCAL_ARGS...` and writes the strays to OUT as JSON.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def device_sentinel():
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, PreTrainedModel

    placed: set[int] = set()
    strays: list[str] = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        if kwargs.get("device_map") == {"": PartialState().device}:
            placed.update(id(module) for module in model.modules())
        return model

    def check(module, _args):
        if isinstance(module, PreTrainedModel) and not torch.is_grad_enabled() and id(module) not in placed:
            strays.append(f"{type(module).__name__} on {next(module.parameters()).device}")

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield strays
    finally:
        handle.remove()
        AutoModelForCausalLM.from_pretrained = classmethod(original)


def main(out: str, argv: list[str]) -> int:
    from refcal.train.cli import main as refcal

    with device_sentinel() as strays:
        try:
            status = refcal(argv)
        finally:
            Path(out).write_text(json.dumps(sorted(set(strays))))
    return status or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
