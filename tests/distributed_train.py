"""Train the tiny regularized setup for 3 steps with a global batch of 4, under any accelerate config.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml tests/distributed_train.py OUT [TOKENIZER_DIR]

Everything is seeded: the tiny model's weights, the data (fixed order), the regularizer's bases and the
Trainer's sampler. The per-device batch is 4 divided by the process count, so every process count sees
the same global batches. On the main process it writes OUT/log_history.json and OUT/adapter.safetensors.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from calibration.models import load_model, load_tokenizer  # noqa: E402
from tiny_setup import build_regularizer, make_trainer, save_tiny_model, sft_rows  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3
LAYERS = [1, 3]


def main() -> None:
    out = Path(sys.argv[1])
    tokenizer_ref = sys.argv[2] if len(sys.argv) > 2 else "embedded:smollm2-135m-instruct"
    # cpu=True: a bare PartialState() under a use_cpu MULTI_GPU launch config reports one process
    # until TrainingArguments initialises the distributed state itself.
    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    processes = state.num_processes
    if GLOBAL_BATCH % processes:
        raise SystemExit(f"global batch {GLOBAL_BATCH} does not split over {processes} processes")

    model_dir = out / "tiny-model"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_tiny_model(load_tokenizer(tokenizer_ref), model_dir, seed=0)
    state.wait_for_everyone()
    model, tokenizer = load_model(str(model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS, seed=0)
    trainer = make_trainer(
        model,
        tokenizer,
        rows,
        regularizer,
        tempfile.mkdtemp(prefix="refcal-ddp-"),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // processes,
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
        ddp_find_unused_parameters=False,
    )
    seen: list[list[int]] = []  # row indices of every local batch, in order
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        seen.append(inputs["row_index"].tolist())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    (out / f"rows.{state.process_index}.json").write_text(json.dumps(seen))
    if state.is_main_process:
        logs = [e for e in trainer.state.log_history if "loss" in e]
        (out / "log_history.json").write_text(json.dumps({"processes": processes, "logs": logs}, indent=2))
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
        save_file(adapter, str(out / "adapter.safetensors"))
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
