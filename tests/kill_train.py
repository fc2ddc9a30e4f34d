"""Train the tiny regularized setup for 6 steps, checkpointing every 2 steps and resuming from the newest
complete checkpoint: the process tests/test_kill.py kills with SIGKILL and starts again.

    python tests/kill_train.py OUT MODEL_DIR       # writes OUT/adapter.safetensors when done
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fixtures import build_regularizer, make_trainer, sft_rows
from peft import get_peft_model_state_dict

from refcal.calibration.infra.artifacts import atomic_save_tensors
from refcal.calibration.models import load_model
from refcal.train.resume import last_checkpoint


def main() -> None:
    out, model_dir = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    model, tokenizer = load_model(model_dir)
    rows = sft_rows(repeat=2)
    regularizer = build_regularizer(model, tokenizer, rows, [1, 3])
    torch.manual_seed(0)  # the same LoRA initialisation in every process
    trainer = make_trainer(
        model,
        tokenizer,
        rows,
        regularizer,
        out / "checkpoints",
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.train(resume_from_checkpoint=last_checkpoint(str(out / "checkpoints")))
    atomic_save_tensors(get_peft_model_state_dict(trainer.model), out / "adapter.safetensors")


if __name__ == "__main__":
    main()
