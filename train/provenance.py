"""What a calibration card records so a run can be reproduced: package versions, the full config, seeds."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "safetensors", "scikit-learn", "refcal")


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "packages": versions}


def config_record(model_args, args, training_args) -> dict:
    """Every field of the three config dataclasses as JSON values (what `--config` plus flags resolved to)."""
    record = {
        "refcal": dataclasses.asdict(args),
        "model": dataclasses.asdict(model_args),
        "training": training_args.to_dict(),
        "seeds": {"training": training_args.seed, "data": args.seed_data},
    }
    return json.loads(json.dumps(record, default=str))
