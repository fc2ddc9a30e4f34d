"""Resuming Trainer jobs: the newest complete checkpoint of an output folder, if any."""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint the Trainer finished writing. It writes trainer_state.json last, so a
    checkpoint killed while being saved lacks it, or holds a truncated one, and is passed over."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = {int(m.group(1)): p for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))}
    for step in sorted(steps, reverse=True):
        try:
            json.loads((steps[step] / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(steps[step])
    return None


def checkpoint_step(checkpoint: str | None) -> int:
    """The global step a checkpoint folder was saved at (0 for none: a fresh start)."""
    return int(CHECKPOINT.match(Path(checkpoint).name).group(1)) if checkpoint else 0
