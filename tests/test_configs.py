"""The shipped configs parse with refcal's TrlParser and name what they calibrate."""

from __future__ import annotations

from pathlib import Path

import pytest

from refcal.train.config import parse

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
FAMILIES = {
    "llama31_8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen25_7b": "Qwen/Qwen2.5-7B-Instruct",
    "gemma2_9b": "google/gemma-2-9b-it",
    "mistral_7b": "mistralai/Mistral-7B-Instruct-v0.3",
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses(path):
    from refcal.train.processes import has_accelerator

    model_args, args, training_args = parse(["--config", str(path)])  # bf16 configs too: refcal picks the device
    assert training_args.use_cpu == (not has_accelerator())
    assert model_args.model_name_or_path
    assert args.run_dir == f"runs/{path.stem.replace('demo_smollm2', 'demo')}"
    assert training_args.output_dir.startswith(args.run_dir)
    assert not training_args.trust_remote_code


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_configs_target_their_model(name):
    model_args, args, training_args = parse(["--config", f"configs/{name}.yaml"])
    assert model_args.model_name_or_path == FAMILIES[name]
    assert training_args.bf16 and not args.organism and model_args.lora_target_modules == "all-linear"


def test_the_device_is_the_machines_unless_the_config_sets_it(tmp_path, monkeypatch):
    from refcal.train.config import ConfigError
    from refcal.train.processes import device_defaults

    monkeypatch.setattr("refcal.train.processes.has_accelerator", lambda: True)
    assert device_defaults() == {}
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # `accelerate launch --cpu`
    assert device_defaults() == {"use_cpu": True}
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    monkeypatch.setattr("refcal.train.processes.has_accelerator", lambda: False)
    assert device_defaults() == {"use_cpu": True}

    config = tmp_path / "mine.yaml"
    config.write_text("model_name_or_path: embedded:smollm2-135m-instruct\nbf16: true\n")
    assert parse(["--config", str(config)])[2].use_cpu
    with pytest.raises(ConfigError, match="bf16"):  # the user's own choice wins, and fails here as it would
        parse(["--config", str(config), "--use_cpu", "false"])
