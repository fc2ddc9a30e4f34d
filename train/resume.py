"""Resuming Trainer jobs: the newest complete checkpoint of an output folder, if any."""

from __future__ import annotations

from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint


def last_checkpoint(output_dir: str) -> str | None:
    return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
