"""Configuration: TRL's ModelConfig and SFTConfig, plus refcal's own arguments, parsed by TrlParser.

A YAML file passed with `--config` sets any field of the three; several `--config` files are layered, later
ones winning (a form overlay on a base config); command-line flags override them all. The module imports
neither torch nor TRL at load time, so that help and config errors answer at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import importlib.metadata
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from refcal.calibration.infra.artifacts import atomic_write_text, cache_root
from refcal.calibration.infra.errors import UserError
from refcal.calibration.judges.phrases import JUDGES
from refcal.data_recipes.yaml_files import read_yaml_mapping

if TYPE_CHECKING:
    from trl import DPOConfig, ModelConfig, SFTConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _all_tasks() -> list[str]:
    return sorted(glob.glob(str(PROJECT_ROOT / "configs" / "tasks" / "*.yaml")))


@dataclass
class RefcalArguments:
    """refcal's stages: data, organism, geometry, targets, regularizer and evaluation settings."""

    # model and data
    run_dir: str = field(default="runs/demo", metadata={"help": "Folder for every stage's artifacts."})
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "Benchmark data folder (default: $REFCAL_DATA_DIR or ../shared/data).",
        },
    )
    tasks: list[str] = field(default_factory=_all_tasks, metadata={"help": "Task cluster YAML files."})
    seed_data: int = field(default=0, metadata={"help": "Seed for content sampling and splits."})
    harmful_sizes: list[int] = field(
        default_factory=lambda: [120, 100, 60],
        metadata={"help": "Raw harmful contents per split (train, val, eval)."},
    )
    benign_sizes: list[int] = field(
        default_factory=lambda: [60, 32, 30],
        metadata={"help": "Raw benign contents per split."},
    )
    over_refusal_per_task: list[int] = field(
        default_factory=lambda: [16, 12, 12],
        metadata={"help": "Framed harmful contents per task and split."},
    )
    benign_per_task: list[int] = field(
        default_factory=lambda: [8, 0, 6],
        metadata={"help": "Framed benign contents per task and split."},
    )
    attack_per_task: list[int] = field(
        default_factory=lambda: [6, 12, 6],
        metadata={"help": "Frame attacks per task and split."},
    )
    lookalike_sizes: list[int] = field(
        default_factory=lambda: [40, 10, 30],
        metadata={"help": "Lookalike pairs per split (val: the safety gate and the tune score them)."},
    )
    held_out_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Task clusters kept out of everything but evaluation: none of their rows, of any kind, reaches the organism, calibration, the loss terms, the directions or the layer choice; summaries report their over-refusal apart.",
        },
    )
    organism: bool = field(
        default=False,
        metadata={
            "help": "First turn the model into an over-refusing organism (for models that refuse nothing).",
        },
    )
    organism_tasks: list[str] = field(
        default_factory=lambda: ["sentiment", "translation", "cipher", "lookalike"],
        metadata={
            "help": "Tasks the organism learns to over-refuse; the others are held out of its over-refusal training.",
        },
    )
    organism_learning_rate: float = field(default=1e-3, metadata={"help": "Organism LoRA learning rate."})
    organism_epochs: float = field(default=1.0, metadata={"help": "Organism training epochs."})
    organism_lora_r: int = field(default=16, metadata={"help": "Organism LoRA rank."})
    generation_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of every stage that only runs the model: generation, the geometry's activations (read "
            "off the generation's prefill) and layer choice, the eval KL; auto: bfloat16 on a GPU that computes in "
            "it, float32 on a CPU (its bf16 kernels round differently from one CPU kind to another).",
        },
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Largest batch size for generation and activation capture (default: from free memory on a GPU, "
            "up to 512; 64 on a CPU); halved automatically on out-of-memory.",
        },
    )

    # calibration
    layer_candidates: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers tried for the refusal direction (default: a fifth to four fifths of the depth, as Arditi et al.).",
        },
    )
    layer_kl_max: float = field(
        default=0.5,
        metadata={"help": "Largest benign next-token KL a chosen layer's ablation may cause."},
    )
    geometry_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "With load_in_4bit: measure the geometry on the 4-bit model too, when the unquantised one does not fit (the card records which).",
        },
    )
    subspace_max_rank: int = field(default=4, metadata={"help": "Largest rank of a task's over-refusal subspace."})
    subspace_variance: float = field(default=0.6, metadata={"help": "Explained variance that sets a subspace's rank."})
    calibrate_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Tasks whose over-refusal is trained away (default: organism_tasks).",
        },
    )
    calibration_over_refusal_per_task: int | None = field(
        default=None,
        metadata={
            "help": "Calibrate with at most this many over_refusal training rows per task (the scarce-data regime): both the answer targets and the over-refusal subspaces the regularizer collapses come from these rows only; the organism and the layer choice still see the whole split.",
        },
    )
    target_max_new_tokens: int = field(default=48, metadata={"help": "Length of generated targets."})

    # training
    objective: str = field(
        default="target_free",
        metadata={
            "help": "Training objective: target_free (the recommended form: over_refusal rows get no answer target, the onset term and any geometry terms move them; harmful, frame_attack and benign rows keep the model's own refusals and answers as SFT targets), sft (answer targets for over_refusal rows too: the task's reference answer or the model's own helpful answer, see train/stages/sft_data.py; rows with neither are dropped), helpful (the same targets where a row has one, no target where it has none) or dpo (preference pairs: answer over refusal for over_refusal and benign rows, refusal over compliance for harmful and frame_attack rows).",
            "choices": ["target_free", "sft", "helpful", "dpo"],
        },
    )
    onset_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the refusal-onset term (train/losses/onset.py): cross-entropy of the probability that the answer's first token opens a refusal, read at the last prompt token; 1 on harmful and frame_attack rows, 0 on calibrated over_refusal and benign rows. Output-side and target-free; 0 leaves it out.",
        },
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the self-distillation guard (train/losses/distill.py): KL from the first-token distribution the model starts training with to the trained model's, on harmful and frame_attack rows. Output-side; 0 leaves it out. At 1 it keeps harmful refusal where the onset term alone leaks in some seeds, and removes about half as much over-refusal (docs/regularizer-study.md#the-guard-study).",
        },
    )
    keep_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the keep term (the regularized SFT form: configs/forms/regularized_sft.yaml sets 1).",
        },
    )
    collapse_weight: float = field(default=0.0, metadata={"help": "Weight of the collapse term (regularized SFT: 1)."})
    retain_weight: float = field(default=0.0, metadata={"help": "Weight of the retain term (regularized SFT: 1)."})
    regularizer_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Layers the regularizer acts on (default: the causally chosen layer)."},
    )
    dpo_beta: float = field(
        default=0.1,
        metadata={
            "help": "DPO's beta: how far the policy may move from the reference (the model without the adapter).",
        },
    )
    dpo_sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "DPO: weight of an SFT loss on the chosen answers beside DPO's (RPO; TRL loss_type [sigmoid, sft]). It anchors their likelihood, which plain DPO can push down when chosen and rejected answers look alike (two refusal texts).",
        },
    )
    init_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Train this adapter further instead of a fresh LoRA (`refcal retrain` sets it).",
        },
    )

    # evaluation and gate
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per evaluation prompt."})
    eval_benchmarks: list[str] = field(
        default_factory=lambda: [
            "xstest_safe",
            "xstest_unsafe",
            "jbb_harmful",
            "jbb_benign",
            "strongreject",
            "harmbench_test",
            "oktest",
            "coconot_contrast",
        ],
        metadata={
            "help": "External benchmark sets evaluated beside the held-out recipe rows (names from data_recipes/sources.py); prompts that overlap a train or val content, exactly or as a near copy, are removed and counted.",
        },
    )
    eval_benchmark_limit: int = field(
        default=100,
        metadata={
            "help": "Prompts sampled per half of each external set (validation and test, cut by content hash).",
        },
    )
    eval_unseen_templates: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate the held-out rows' contents in each task's held_out_templates and held_out_attack_templates, phrasings never trained on (kinds over_refusal_unseen_template, frame_attack_unseen_template).",
        },
    )
    judge: str = field(
        default="learned",
        metadata={
            "help": "Refusal judge: learned (phrase rules + a classifier fitted on XSTest's human labels), phrases, local_model (judge_model, a local causal LM asked to classify) or http (an OpenAI-compatible endpoint).",
            "choices": list(JUDGES),
        },
    )
    judge_model: str | None = field(
        default=None,
        metadata={
            "help": "local_model: a model reference; http: the served model's name.",
        },
    )
    judge_url: str | None = field(
        default=None,
        metadata={
            "help": "http: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 (the key, if any, from $OPENAI_API_KEY).",
        },
    )
    judge_timeout: float = field(default=30.0, metadata={"help": "http: seconds before a request is retried."})
    judge_retries: int = field(
        default=3,
        metadata={
            "help": "http: retries after a timeout, a 429/5xx reply or an answer that names no label.",
        },
    )
    safety_gate_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "The safety gate withholds an adapter when, on any harmful-side measure of the validation half (recipe harmful rows, frame attacks and framed over_refusal rows carried out, each external harmful set), the one-sided upper 95-percent confidence bound of its paired loss of safe answers exceeds this (0.05: 5 points). A bound needs prompts: with none changed, about 52 per measure reach 5 points.",
        },
    )
    safety_gate_skip: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Gate measures a run may lack, by name (e.g. jbb_harmful); any other missing measure fails the gate.",
        },
    )
    force_export: bool = field(
        default=False,
        metadata={
            "help": "Export even when the safety gate fails (the card records it).",
        },
    )
    strict_gate: bool = field(
        default=True,
        metadata={
            "help": "`refcal run` and `refcal export` exit with status 3 when the safety gate withholds the export (after printing the table and the verdict); false: status 0, the export still withheld.",
        },
    )
    export_merge: bool = field(
        default=False,
        metadata={
            "help": "Export also writes run_dir/export/merged: the calibrated model with the adapter merged in (`refcal export --merge`).",
        },
    )
    summary_json: str | None = field(
        default=None,
        metadata={
            "help": "Also write the run summary here (run_dir/summary.json is always written).",
        },
    )
    scan_over_refusal_threshold: float = field(
        default=0.2,
        metadata={
            "help": "`refcal scan`: a task cluster whose over_refusal prompts the model refuses more often than this is suggested for calibrate_tasks.",
        },
    )
    scan_harmful_floor: float = field(
        default=0.8,
        metadata={
            "help": "`refcal scan`: harmful and frame-attack kinds, per cluster and overall, and external harmful sets refused less often than this are reported as weak refusal, which calibration must not make worse.",
        },
    )
    orthogonalisation_coefficients: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={
            "help": "Baselines: false-refusal vector ablations, one per partial orthogonalisation coefficient (1 = fully orthogonal to the harmful direction, 0 = raw).",
        },
    )
    steering_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "Baselines: layers task-conditioned steering acts on (default: the chosen layer).",
        },
    )
    steering_route_layer: int | None = field(
        default=None,
        metadata={
            "help": "Baselines: layer whose last-token activation routes a prompt to a task cluster (default: the chosen layer).",
        },
    )
    steering_scale: float = field(
        default=1.0,
        metadata={
            "help": "Baselines: multiple of the task's over-refusal direction that steering subtracts.",
        },
    )
    baselines_json: str | None = field(
        default=None,
        metadata={
            "help": "Also write the baselines' results here (`make bench`: bench/results/baselines_organism.json).",
        },
    )
    report_permutations: int = field(
        default=100,
        metadata={
            "help": "Label shuffles per probe in the geometry report's permutation tests.",
        },
    )

    # tune: `refcal tune` searches these settings, each trial scored on the validation half
    tune: bool = field(
        default=False,
        metadata={
            "help": "`refcal run` (and `accelerate launch train.py`) tunes instead of training the config as it is: the shared stages, then `refcal tune`'s search, the chosen trial's export and the test half."
        },
    )
    tune_trials: int = field(
        default=16,
        metadata={
            "help": "`refcal tune`: trials in the study, all workers together; a resumed tune runs only the missing ones."
        },
    )
    tune_storage: str | None = field(
        default=None,
        metadata={
            "help": "`refcal tune`: the study's database URL, for workers on several machines (e.g. postgresql://user:password@host/refcal); default: sqlite in run_dir/tune/study.db.",
        },
    )
    tune_compare_default: bool = field(
        default=True,
        metadata={
            "help": "`refcal tune`: also train and evaluate the config as it is (the default form) on the test half, beside the chosen trial.",
        },
    )
    tune_learning_rates: list[float] = field(
        default_factory=lambda: [2.0e-4, 3.0e-3],
        metadata={"help": "`refcal tune`: the learning rate's range, searched on a log scale."},
    )
    tune_epochs: list[float] = field(
        default_factory=lambda: [0.5, 1.0, 1.5, 2.0],
        metadata={"help": "`refcal tune`: the epochs a trial may train."},
    )
    tune_onset_weights: list[float] = field(
        default_factory=lambda: [0.25, 4.0],
        metadata={"help": "`refcal tune`: the onset term's weight range, searched on a log scale."},
    )
    tune_distill_weights: list[float] = field(
        default_factory=lambda: [0.0, 0.3, 0.5, 1.0],
        metadata={"help": "`refcal tune`: the self-distillation guard's weights a trial may take."},
    )
    tune_objectives: list[str] = field(
        default_factory=lambda: ["target_free", "helpful"],
        metadata={
            "help": "`refcal tune`: the objectives a trial may take, i.e. where its over_refusal rows get their target: target_free (none; the onset term moves them) or helpful (the model's own helpful answer where it has one: its answer with the refusal direction ablated, kept only when it is not a refusal, does not carry out the request and passes the task's answer check; none otherwise); sft and dpo are allowed too."
        },
    )
    tune_lora_ranks: list[int] = field(
        default_factory=lambda: [4, 8, 16, 32],
        metadata={"help": "`refcal tune`: the LoRA ranks a trial may take (lora_alpha: twice the rank)."},
    )

    # research
    geometry_targets: str = field(
        default="anchors",
        metadata={
            "help": "objective target_free: anchors (harmful, frame_attack and benign rows keep their SFT targets, the model's own refusals and answers) or none (no language-modelling loss at all: the regularizer alone).",
            "choices": ["anchors", "none"],
        },
    )
    regularizer_positions: str = field(
        default="last",
        metadata={
            "help": "Prompt tokens the regularizer acts on: the last one, or the chat template's post-instruction tail (end of the user turn and the assistant header).",
            "choices": ["last", "tail"],
        },
    )
    regularizer_layers_to_last: bool = field(
        default=False,
        metadata={
            "help": "With regularizer_layers unset: act on every layer from the causally chosen one to the last, not the chosen one alone.",
        },
    )
    keep_rows: str = field(
        default="all",
        metadata={
            "help": "Rows the keep term holds: all (harmful and frame_attack rows up on r, benign and over_refusal rows down) or should_refuse (only the first half: a guard of harmful refusal that leaves the answered rows free).",
            "choices": ["all", "should_refuse"],
        },
    )
    keep_direction: str = field(
        default="frozen",
        metadata={
            "help": "The harmful direction the keep term holds rows on: frozen (estimated before training) or live (re-estimated from the model being trained every keep_refresh_steps steps, each row's reference kept as its height above the benign mean; train/losses/live_direction.py). live needs regularizer_positions last.",
            "choices": ["frozen", "live"],
        },
    )
    keep_refresh_steps: int = field(
        default=8,
        metadata={"help": "With keep_direction live: optimizer steps between re-estimates of r."},
    )
    collapse_harmful_component: bool = field(
        default=True, metadata={"help": "Collapse also the r component of over_refusal rows."}
    )
    onset_min_refusal_share: float = field(
        default=0.05,
        metadata={
            "help": "Onset term: a token joins the refusal-onset tokens when it opens at least this share of the training rows' refusals (and rarely their answers); 0 takes every opening the model's refusals use.",
        },
    )

    def resolved_calibrate_tasks(self) -> list[str]:
        return list(self.calibrate_tasks or self.organism_tasks)


# Each group of fields, by its first field: a group runs in the dataclass's order up to the next one's start
# (the comments in RefcalArguments); docs/configuration.md shows one section per group.
GROUP_STARTS = {
    "run_dir": "model and data",
    "layer_candidates": "calibration",
    "objective": "training",
    "eval_max_new_tokens": "evaluation and gate",
    "tune": "tune",
    "geometry_targets": "research",
}


def field_groups() -> dict[str, str]:
    """Each of RefcalArguments' fields, by name, with its group."""
    groups, group = {}, None
    for spec in dataclasses.fields(RefcalArguments):
        group = GROUP_STARTS.get(spec.name, group)
        groups[spec.name] = group
    return groups


class ConfigError(UserError, ValueError):
    """A config file or flag refcal cannot use; the message names the file and the field."""


def config_classes() -> tuple[type, ...]:
    from trl import ModelConfig, SFTConfig

    return (ModelConfig, RefcalArguments, SFTConfig)


def _parser_facts() -> dict:
    """Every field name and the full `--help` text, cached per version of TRL, transformers and this module:
    building them imports TRL (and torch), seconds that `refcal STAGE --help` and a misspelt field should not
    cost."""
    versions = [importlib.metadata.version(name) for name in ("trl", "transformers")]
    key = hashlib.sha256(json.dumps([versions, Path(__file__).read_text()]).encode()).hexdigest()[:16]
    path = cache_root() / "cli" / f"fields-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    facts = {
        # `env` is TrlParser's own key: a mapping of environment variables to set
        "fields": sorted([*(f.name for cls in config_classes() for f in dataclasses.fields(cls) if f.init), "env"]),
        "help": _Parser.build().format_help(),
    }
    try:
        atomic_write_text(path, json.dumps(facts))
    except OSError:  # a read-only cache: answer anyway
        pass
    return facts


def known_fields() -> set[str]:
    return set(_parser_facts()["fields"])


def field_help() -> str:
    """`refcal STAGE --help`: every field of the three config classes."""
    return _parser_facts()["help"]


def check_config_file(path: str | Path) -> dict:
    """The YAML mapping in `path`, or a ConfigError naming the file, the line or the unknown field (with the
    closest known names), before TrlParser sees it."""
    path = Path(path)
    try:
        raw = read_yaml_mapping(path, ConfigError, "config fields")
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: config file not found") from error
    known = known_fields() | {"env"}  # TrlParser sets the environment variables of a config's `env` mapping
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`refcal run --help` lists every field)"
            raise ConfigError(f"{path}: unknown field {key!r}{hint}")
    return raw


class _Parser:
    """TrlParser whose argparse errors (a value of the wrong type) raise a ConfigError naming the config."""

    @staticmethod
    def build(source: str = "the command line"):
        from trl import TrlParser

        class Parser(TrlParser):
            def error(self, message: str):
                raise ConfigError(f"{source}: {message}")

        return Parser(config_classes(), prog="refcal STAGE")


def _take_configs(argv: list[str]) -> tuple[list[str], list[str]]:
    """The `--config FILE` values of argv, in order, and argv without them."""
    files, rest, at = [], [], 0
    while at < len(argv):
        if argv[at] == "--config" and at + 1 < len(argv):
            files.append(argv[at + 1])
            at += 2
        else:
            rest.append(argv[at])
            at += 1
    return files, rest


def _flag_value(argv: list[str], name: str) -> str | None:
    flag = f"--{name}"
    return argv[argv.index(flag) + 1] if flag in argv and argv.index(flag) + 1 < len(argv) else None


def parse(argv: list[str] | None = None) -> tuple[ModelConfig, RefcalArguments, SFTConfig]:
    argv = sys.argv[1:] if argv is None else list(argv)
    files, argv = _take_configs(argv)
    merged: dict = {}
    for path in files:  # each file checked on its own, so that an error names the file it is in
        merged.update(check_config_file(path))
    source = " + ".join(files) or "the command line"
    from refcal.train.processes import device_defaults  # torch: only once the config files are known good
    from refcal.train.speed import speed_defaults

    parser = _Parser.build(source)
    run_dir = _flag_value(argv, "run_dir") or merged.get("run_dir") or RefcalArguments.run_dir
    model = _flag_value(argv, "model_name_or_path") or merged.get("model_name_or_path")
    remote_code = (
        str(_flag_value(argv, "trust_remote_code") or merged.get("trust_remote_code", False)).lower() == "true"
    )
    # Defaults a config or flag overrides: the Trainer's checkpoints in the run folder, the device the machine
    # has (set before SFTConfig is built: building it sets up the process state every stage reads), and the
    # speed settings that suit the model's size.
    parser.set_defaults(
        output_dir=str(Path(run_dir) / "train"), **device_defaults(), **speed_defaults(model, remote_code)
    )
    with tempfile.TemporaryDirectory() as folder:
        if files:  # one file for TrlParser: the layers merged, later files winning
            layered = Path(folder) / "config.yaml"
            layered.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
            argv = ["--config", str(layered), *argv]
        try:
            model_args, refcal_args, training_args = parser.parse_args_and_config(args=argv)
        except ConfigError:
            raise
        except ValueError as error:  # a value the dataclasses' own checks reject (fp16 on a CPU, ...)
            raise ConfigError(f"{source}: {error}") from error
    return model_args, refcal_args, training_args


def dpo_config(sft_config: SFTConfig, beta: float, sft_weight: float = 0.0) -> DPOConfig:
    """The run's training arguments (TrainingArguments' fields and max_length) as a DPOConfig; with
    `sft_weight`, DPO's loss plus that much SFT loss on the chosen answers."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    shared = {f.name: getattr(sft_config, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight > 0 else {}
    return DPOConfig(**shared, max_length=sft_config.max_length, beta=beta, **losses)
