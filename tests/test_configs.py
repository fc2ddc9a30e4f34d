"""The shipped configs parse with refcal's TrlParser and name what they calibrate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from refcal.train.config import ConfigError, parse

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
    from refcal.train.processes import device_defaults

    monkeypatch.setattr("refcal.train.processes.has_accelerator", lambda: True)
    monkeypatch.setattr("refcal.train.processes.native_bf16", lambda cpu: True)
    assert device_defaults() == {}
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # `accelerate launch --cpu`
    assert device_defaults() == {"use_cpu": True, "bf16": False}
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    monkeypatch.setattr("refcal.train.processes.has_accelerator", lambda: False)
    assert device_defaults() == {"use_cpu": True, "bf16": False}  # CPUs train in fp32, native bf16 or not
    monkeypatch.setattr("refcal.train.processes.has_accelerator", lambda: True)
    monkeypatch.setattr("refcal.train.processes.native_bf16", lambda cpu: False)  # an accelerator without bf16
    assert device_defaults() == {"bf16": False}
    monkeypatch.setattr("refcal.train.processes.has_accelerator", lambda: False)

    config = tmp_path / "mine.yaml"
    config.write_text("model_name_or_path: embedded:smollm2-135m-instruct\nbf16: true\n")
    assert parse(["--config", str(config)])[2].use_cpu
    with pytest.raises(ConfigError, match="bf16"):  # the user's own choice wins, and fails here as it would
        parse(["--config", str(config), "--use_cpu", "false"])


FORM_FIELDS = ("objective", "onset_weight", "keep_weight", "collapse_weight", "retain_weight")


def test_a_minimal_config_runs_where_it_is(tmp_path):
    """Model, tasks and run folder are enough: the device, precision and checkpoint folder follow from them."""
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"model_name_or_path: embedded:smollm2-135m-instruct\ntasks: [configs/tasks/sentiment.yaml]\nrun_dir: {tmp_path / 'run'}\n"
    )
    from refcal.train.processes import native_bf16

    _, args, training_args = parse(["--config", str(config)])
    assert training_args.output_dir == str(tmp_path / "run" / "train")
    assert training_args.bf16 == (not training_args.use_cpu and native_bf16(False))  # the machine's precision
    # a small model: padding-free batches and no gradient checkpointing
    assert training_args.padding_free and not training_args.gradient_checkpointing
    assert args.objective == "target_free" and args.onset_weight == 1.0
    moved = parse(["--config", str(config), "--run_dir", str(tmp_path / "elsewhere")])[2]
    assert moved.output_dir == str(tmp_path / "elsewhere" / "train")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_train_the_recommended_form(path):
    """The demo and the model-family configs agree with the field defaults: the recommended form."""
    from refcal.train.config import RefcalArguments

    args = parse(["--config", str(path)])[1]
    assert {f: getattr(args, f) for f in FORM_FIELDS} == {f: getattr(RefcalArguments(), f) for f in FORM_FIELDS}


@pytest.mark.parametrize(
    ("form", "objective", "weights"),
    [("regularized_sft", "sft", (0, 1, 1, 1)), ("plain_sft", "sft", (0, 0, 0, 0)), ("dpo", "dpo", (0, 1, 1, 1))],
)
def test_form_overlays_layer_on_the_demo(form, objective, weights):
    _, args, training_args = parse(["--config", "configs/demo_smollm2.yaml", "--config", f"configs/forms/{form}.yaml"])
    assert args.objective == objective
    assert (args.onset_weight, args.keep_weight, args.collapse_weight, args.retain_weight) == weights
    assert args.harmful_sizes == [48, 24, 60] and args.organism  # the base config's fields stay
    flagged = parse(
        ["--config", "configs/demo_smollm2.yaml", "--config", f"configs/forms/{form}.yaml", "--keep_weight", "3"]
    )
    assert flagged[1].keep_weight == 3.0  # flags override every file


def test_a_later_config_wins_and_errors_name_their_file(tmp_path):

    base, overlay, wrong = tmp_path / "base.yaml", tmp_path / "overlay.yaml", tmp_path / "wrong.yaml"
    base.write_text("model_name_or_path: embedded:smollm2-135m-instruct\nseed_data: 1\nlayer_kl_max: 2.0\n")
    overlay.write_text("seed_data: 5\n")
    wrong.write_text("seed_dta: 5\n")
    args = parse(["--config", str(base), "--config", str(overlay)])[1]
    assert (args.seed_data, args.layer_kl_max) == (5, 2.0)
    with pytest.raises(ConfigError, match=r"wrong\.yaml: unknown field 'seed_dta'; did you mean seed_data"):
        parse(["--config", str(base), "--config", str(wrong)])


def test_an_objective_outside_the_choices_is_refused():
    with pytest.raises(ConfigError, match="invalid choice: 'geometry'"):
        parse(["--config", "configs/demo_smollm2.yaml", "--objective", "geometry"])


@pytest.mark.e2e  # runs the CLI in fresh Python subprocesses
def test_help_and_config_errors_import_no_torch(tmp_path):
    """`refcal --help`, `refcal STAGE --help` (from its cache) and a misspelt field answer without torch."""
    config = tmp_path / "typo.yaml"
    config.write_text("model_name_or_path: x\nlerning_rate: 1\n")
    env_cache = {"REFCAL_CACHE": str(tmp_path / "cache")}
    probe = (
        "import sys\nfrom refcal.train.cli import main\n"
        "for argv in {argvs!r}:\n"
        "    try:\n        main(argv)\n    except SystemExit as exit:\n        print('exit', exit.code)\n"
        "print('torch' in sys.modules)\n"
    )
    env = {**os.environ, **env_cache}
    warm = subprocess.run(
        [sys.executable, "-c", probe.format(argvs=[["train", "--help"]])], env=env, capture_output=True, text=True
    )
    assert "--learning_rate" in warm.stdout and "--onset_weight" in warm.stdout, warm.stderr
    argvs = [["--help"], ["train", "--help"], ["run", "--config", str(config)]]
    done = subprocess.run([sys.executable, "-c", probe.format(argvs=argvs)], env=env, capture_output=True, text=True)
    assert "usage: refcal train" in done.stdout and "exit 2" in done.stdout
    assert "unknown field 'lerning_rate'" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout


def test_speed_defaults_follow_the_model_and_yield_to_the_config(tmp_path):
    """Under a billion parameters no gradient checkpointing; padding-free batches unless the model brings
    code of its own; a model whose config is not at hand keeps TRL's checkpointing; a config's choice wins."""
    from transformers import LlamaConfig

    from refcal.train.speed import speed_defaults

    large = tmp_path / "large"
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32000).save_pretrained(
        large
    )
    assert speed_defaults("embedded:smollm2-135m-instruct") == {"padding_free": True, "gradient_checkpointing": False}
    assert speed_defaults(str(large)) == {"padding_free": True}
    assert speed_defaults("some-org/not-in-the-local-cache") == {"padding_free": True}
    assert speed_defaults(str(large), trust_remote_code=True) == {}

    config = tmp_path / "mine.yaml"
    config.write_text(f"model_name_or_path: {large}\ntasks: [configs/tasks/sentiment.yaml]\nrun_dir: {tmp_path}\n")
    assert parse(["--config", str(config)])[2].gradient_checkpointing
    chosen = parse(["--config", str(config), "--padding_free", "false", "--model_name_or_path", "embedded:smollm2-135m-instruct",
                    "--gradient_checkpointing", "true"])[2]  # fmt: skip
    assert not chosen.padding_free and chosen.gradient_checkpointing
