"""The shipped configs parse with refcal's TrlParser and name what they calibrate."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import parse

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
FAMILIES = {
    "llama31_8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen25_7b": "Qwen/Qwen2.5-7B-Instruct",
    "gemma2_9b": "google/gemma-2-9b-it",
    "mistral_7b": "mistralai/Mistral-7B-Instruct-v0.3",
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path):
    model_args, args, training_args = parse(["--config", str(path), "--use_cpu", "true"])  # bf16 needs a GPU or use_cpu
    assert model_args.model_name_or_path
    assert args.run_dir == f"runs/{path.stem.replace('demo_smollm2', 'demo')}"
    assert training_args.output_dir.startswith(args.run_dir)
    assert not training_args.trust_remote_code


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_configs_target_their_model(name):
    model_args, args, training_args = parse(["--config", f"configs/{name}.yaml", "--use_cpu", "true"])
    assert model_args.model_name_or_path == FAMILIES[name]
    assert training_args.bf16 and not args.organism and model_args.lora_target_modules == "all-linear"
