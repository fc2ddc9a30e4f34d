"""Session fixtures: the real chat tokenizer and a tiny, randomly initialised Llama that uses it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_setup helpers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

EMBEDDED = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tokenizer():
    from calibration.models import load_tokenizer

    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    from tiny_setup import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(tokenizer, directory, seed=0)
    return directory
