"""The whole job as stages that each write an artifact folder under run_dir and are skipped when done.

data -> organism (optional) -> geometry -> train -> eval -> export. A stage is done when its folder
exists: folders are written through a staging folder and renamed whole, so a killed run leaves either
nothing or a complete stage, and the training stage resumes from its last Trainer checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from accelerate import PartialState
from datasets import Dataset, load_from_disk
from peft import PeftModel
from rich.console import Console
from trl import ModelConfig, SFTConfig
from transformers.trainer import TRAINING_ARGS_NAME
from trl.trainer.utils import get_peft_config

from refcal.calibration.activations import NonFiniteActivations, capture_last_token, template_tail_length
from refcal.calibration.artifacts import atomic_directory, atomic_save_tensors, atomic_write_text, remove_stale_staging
from refcal.calibration.generation import generate
from refcal.calibration.geometry import Geometry, estimate
from refcal.calibration.frame_judge import FrameJudge
from refcal.calibration.judge import build_judge, refused
from refcal.calibration.layer_choice import choose_layer, refusal_tokens
from refcal.calibration.models import fingerprint, four_bit_config, load_model, load_tokenizer
from refcal.data_recipes.build import RecipeSizes, build_rows, check_disjoint, manifest, to_dataset_dict
from refcal.data_recipes.tasks import load_tasks
from refcal.data_recipes.preferences import build_preferences, preference_dataset
from refcal.data_recipes.targets import build_targets, sft_dataset
from refcal.train.config import ConfigError, RefcalArguments, dpo_config
from refcal.train.data_checks import check_calibrated_tasks, check_prompt_lengths
from refcal.train.onset import build_onset
from refcal.train.organism import build_organism
from refcal.train.processes import engine_record, global_batch, precision, waiting_processes_threads
from refcal.train.resume import checkpoint_step, last_checkpoint
from refcal.train.retrain import check_adapter_base
from refcal.train.regularizer import GeometryRegularizer
from refcal.train.trainer import RefcalDPOTrainer, RefcalSFTTrainer, RowIndexCollator

console = Console(stderr=True)
STAGES = ("data", "organism", "geometry", "train", "eval", "export")


class Run:
    """Paths and shared state of one run folder."""

    def __init__(self, model_args: ModelConfig, args: RefcalArguments, training_args: SFTConfig):
        self.model_args, self.args, self.training_args = model_args, args, training_args
        self.dir = Path(args.run_dir)
        self.state = PartialState()
        self._judge = None  # built on first use: the learned judge fits in seconds, a model judge loads a model
        self._recipe = None  # the data stage's DatasetDict, read once

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def judge(self):
        if self._judge is None:
            a = self.args
            self._judge = build_judge(a.judge, a.data_root, a.judge_model, a.judge_url, a.judge_timeout, a.judge_retries,
                                      self.training_args.trust_remote_code)
        return self._judge

    @property
    def frame_judge(self) -> FrameJudge:
        return FrameJudge(self.judge)

    def done(self, stage: str) -> bool:
        """A stage's folder appears whole (atomic rename), except train's: the configs put the Trainer's
        output_dir there, so its checkpoints exist before the stage is done; train.json is written last."""
        folder = self.path(stage)
        return folder.is_dir() and (stage != "train" or (folder / "train.json").is_file())

    @property
    def model_reference(self) -> str:
        """The model being calibrated: the organism when the run builds one, else the given model."""
        record = self.path("organism") / "organism.json"
        if self.args.organism:
            return json.loads(record.read_text())["path"]
        return self.model_args.model_name_or_path

    def rows(self, split: str) -> list[dict]:
        if self._recipe is None:
            self._recipe = load_from_disk(str(self.path("data") / "recipe"))
        return self._recipe[split].to_list()

    def load(self, dtype: str = "float32", qlora: bool = False):
        """The model being calibrated; with `qlora`, in 4 bits when the config asks for QLoRA (load_in_4bit)."""
        if self.model_args.load_in_8bit:
            raise ValueError("refcal supports 4-bit QLoRA (load_in_4bit: true), not 8-bit loading (load_in_8bit)")
        quantization = four_bit_config(self.model_args.bnb_4bit_quant_type) if qlora and self.uses_qlora else None
        # trust_remote_code is SFTConfig's field, off by default
        return load_model(self.model_reference, dtype, self.training_args.trust_remote_code, quantization)

    def geometry_for(self, model) -> Geometry:
        """The geometry stage's artifact, refused with both fingerprints shown when it was measured on
        other weights than `model`'s (say, an organism rebuilt in the cache since). Under QLoRA the check
        is the run folder's: 4-bit weights cannot match an unquantised fingerprint."""
        return Geometry.load(self.path("geometry"), None if self.uses_qlora else fingerprint(model))

    @property
    def uses_qlora(self) -> bool:
        return bool(self.model_args.load_in_4bit)

    def weights_description(self, qlora: bool) -> str:
        if qlora and self.uses_qlora:
            return f"4-bit {self.model_args.bnb_4bit_quant_type} (bitsandbytes), double quantisation, bf16 compute"
        return "unquantised"

    def main_only(self, stage: str, work) -> None:
        """Run a single-process stage on the main process while the others wait for its folder. They poll
        rather than wait at a barrier, which times out after ddp_timeout (30 minutes by default): eval or
        geometry can take longer on a CPU or with a large model. If the main process fails, the launcher
        stops them all."""
        if self.state.is_main_process and not self.done(stage):
            started = time.time()
            with waiting_processes_threads(self.state):
                work()
            console.print(f"[green]✓[/] {stage} ({time.time() - started:.0f}s) -> {self.path(stage)}")
        while not self.state.is_main_process and not self.done(stage):
            time.sleep(1)
        self.state.wait_for_everyone()


def recipe_rows(a: RefcalArguments) -> tuple[list[dict], list, RecipeSizes]:
    """The config's contrastive rows (deterministic in its seed), its task clusters and sizes."""
    tasks = load_tasks(a.tasks)
    sizes = RecipeSizes(
        tuple(a.harmful_sizes), tuple(a.benign_sizes), tuple(a.over_refusal_per_task),
        tuple(a.benign_per_task), tuple(a.attack_per_task), tuple(a.lookalike_sizes),
    )
    rows = build_rows(tasks, sizes, a.seed_data, a.data_root)
    check_disjoint(rows)
    return rows, tasks, sizes


def stage_data(run: Run) -> None:
    a = run.args
    rows, tasks, sizes = recipe_rows(a)
    check_calibrated_tasks(rows, a.resolved_calibrate_tasks(), a.tasks)
    try:  # the prompt-length check needs the model's chat template
        tokenizer = load_tokenizer(run.model_args.model_name_or_path, run.training_args.trust_remote_code)
    except OSError as error:
        raise ConfigError(f"model_name_or_path {run.model_args.model_name_or_path!r}: cannot load its tokenizer ({error})") from error
    check_prompt_lengths(rows, tokenizer, run.training_args.max_length, a.target_max_new_tokens)
    with atomic_directory(run.path("data")) as staging:
        to_dataset_dict(rows).save_to_disk(str(staging / "recipe"))
        (staging / "manifest.json").write_text(json.dumps(manifest(rows, tasks, sizes, a.seed_data, a.data_root), indent=2))


def stage_organism(run: Run) -> None:
    """Distributed: every process joins the organism's training; the main one saves it."""
    if run.done("organism") or not run.args.organism:
        return
    a, t = run.args, run.training_args
    organism_args = dataclasses.replace(
        t,
        output_dir=str(run.dir / "checkpoints" / "organism"),
        learning_rate=a.organism_learning_rate,
        num_train_epochs=a.organism_epochs,
        max_steps=-1,
        # plain SFT on every layer's LoRA weights: DDP need not search the graph for unused ones each step
        ddp_find_unused_parameters=False if t.ddp_find_unused_parameters is None else t.ddp_find_unused_parameters,
    )
    settings = {
        "learning_rate": a.organism_learning_rate, "epochs": a.organism_epochs, "lora_r": a.organism_lora_r,
        "answer_max_new_tokens": a.target_max_new_tokens, "seed": t.seed,
        # the organism is a function of the global batch, however it is split over processes, and of precision
        "global_batch": global_batch(t, run.state.num_processes),
        "precision": precision(t),
    }
    manifest_data = json.loads((run.path("data") / "manifest.json").read_text())
    rows = run.rows("train")
    held_out = sorted({r["task"] for r in rows if r["kind"] == "over_refusal"} - set(a.organism_tasks))
    path, record = build_organism(
        run.model_args.model_name_or_path, rows, list(a.organism_tasks), settings, organism_args,
        manifest_data["rows_hash"], a.generation_dtype, a.generation_batch_size, run.state,
    )
    record["held_out_tasks"] = held_out
    if run.state.is_main_process:
        with atomic_directory(run.path("organism")) as staging:
            (staging / "organism.json").write_text(json.dumps(record, indent=2))
    run.state.wait_for_everyone()


def stage_geometry(run: Run) -> None:
    a = run.args
    rows = run.rows("train")
    val = run.rows("val")
    gen_model, tokenizer = run.load(a.generation_dtype, qlora=a.geometry_in_4bit)
    prompts = [r["prompt"] for r in rows]
    responses = generate(gen_model, tokenizer, prompts, a.target_max_new_tokens, a.generation_batch_size, desc="own responses")
    labels = run.judge.label(prompts, responses)
    del gen_model
    model, tokenizer = run.load("float32", qlora=a.geometry_in_4bit)
    model_fp = fingerprint(model)
    try:
        activations = capture_last_token(model, tokenizer, prompts, batch_size=a.generation_batch_size)
    except NonFiniteActivations as error:
        tasks = sorted({f"{rows[i]['kind']}/{rows[i]['task']}" for i in error.rows})
        raise NonFiniteActivations(f"{error} in rows of {tasks}, e.g. {rows[error.rows[0]]['id']}", error.rows, error.layers) from error
    geometry = estimate(
        activations, [r["kind"] for r in rows], [r["task"] for r in rows], [refused(lab) for lab in labels],
        model_fp, a.subspace_max_rank, a.subspace_variance,
    )
    num_layers = activations.shape[1]
    candidates = a.layer_candidates or list(range(int(0.2 * num_layers), int(0.8 * num_layers) + 1))
    tokens = refusal_tokens(tokenizer, [r for r, lab, row in zip(responses, labels, rows) if refused(lab) and row["kind"] == "harmful"])
    layer, table = choose_layer(
        model, tokenizer, geometry,
        [r["prompt"] for r in val if r["kind"] == "harmful"], [r["prompt"] for r in val if r["kind"] == "benign"],
        tokens, candidates, a.layer_kl_max, a.generation_batch_size,
    )
    geometry.layer = layer
    geometry.info.update({
        "layer_scores": table, "refusal_tokens": tokenizer.convert_ids_to_tokens(tokens),
        "weights": run.weights_description(a.geometry_in_4bit),
    })
    with atomic_directory(run.path("geometry")) as staging:
        geometry.save(staging)
        atomic_save_tensors({"last_token": activations.contiguous()}, staging / "activations.safetensors")
        with open(staging / "responses.jsonl", "w", encoding="utf-8") as handle:
            for row, response, label in zip(rows, responses, labels):
                handle.write(json.dumps({"id": row["id"], "response": response, "label": label}) + "\n")


def geometry_report(run: Run, directory: str) -> Path:
    """The paper's measurements on this run's frozen model (organism or base), from the geometry stage's
    cached activations and judged responses; probes at every third layer and the chosen one."""
    from refcal.calibration.geometry_report import analyse, write_report  # scikit-learn: only when a report is asked for

    geometry = Geometry.load(run.path("geometry"))
    activations = load_file(run.path("geometry") / "activations.safetensors")["last_token"].float().numpy()
    _, labels = load_responses(run)
    rows = run.rows("train")
    num_layers = activations.shape[1]
    probe_layers = sorted({*range(0, num_layers, 3), geometry.layer})
    analysis = analyse(
        activations, [r["kind"] for r in rows], [r["task"] for r in rows], [refused(labels[r["id"]]) for r in rows],
        probe_layers, run.args.report_permutations, run.training_args.seed,
    )
    model = run.model_args.model_name_or_path
    if run.args.organism:
        model = f"the organism built on {model} (cache key {json.loads((run.path('organism') / 'organism.json').read_text())['key']})"
    return write_report(analysis, geometry.layer, directory, model)


def load_responses(run: Run) -> tuple[dict[str, str], dict[str, str]]:
    records = [json.loads(line) for line in (run.path("geometry") / "responses.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in records}, {r["id"]: r["label"] for r in records}


def prepare_sft_data(run: Run) -> None:
    """Target responses for the training rows (main process; cached under run_dir/sft_data)."""
    a = run.args
    responses, labels = load_responses(run)
    calibrate = set(a.resolved_calibrate_tasks())
    answer_tasks = {task.name: task for task in load_tasks(a.tasks) if task.name in calibrate}
    model, tokenizer = run.load(a.generation_dtype)
    geometry = run.geometry_for(model)
    sft_rows, stats = build_targets(
        calibration_rows(run), responses, labels, model, tokenizer, run.judge, geometry.direction(geometry.layer),
        answer_tasks, a.target_max_new_tokens, a.generation_batch_size, target_free=a.objective == "geometry",
    )
    record = {"objective": a.objective, "rows": len(sft_rows), "how": stats}
    if a.objective == "dpo":
        pairs, record["preferences"] = build_preferences(
            sft_rows, responses, labels, model, tokenizer, run.judge, geometry.direction(geometry.layer),
            a.target_max_new_tokens, a.generation_batch_size,
        )
    with atomic_directory(run.path("sft_data")) as staging:
        Dataset.from_list(sft_rows).save_to_disk(str(staging / "dataset"))
        if a.objective == "dpo":
            Dataset.from_list(pairs).save_to_disk(str(staging / "preferences"))
        (staging / "targets.json").write_text(json.dumps(record, indent=2))


def calibration_rows(run: Run) -> list[dict]:
    """The training rows calibration learns from: all of them, or at most
    calibration_over_refusal_per_task over_refusal rows per task (the first ones; row order is random)."""
    limit = run.args.calibration_over_refusal_per_task
    rows = run.rows("train")
    if limit is None:
        return rows
    taken: dict[str, int] = {}
    kept = []
    for row in rows:
        if row["kind"] == "over_refusal":
            taken[row["task"]] = taken.get(row["task"], 0) + 1
            if taken[row["task"]] > limit:
                continue
        kept.append(row)
    return kept


def build_regularizer(run: Run, sft_rows: list[dict], geometry: Geometry, model=None, tokenizer=None) -> GeometryRegularizer:
    """The regularizer's references: the geometry run's cached last-token activations, or (positions:
    tail) the frozen `model`'s activations at each row's post-instruction tokens, captured here."""
    a = run.args
    layers = a.regularizer_layers or [geometry.layer]
    train_ids = [r["id"] for r in run.rows("train")]
    position = {rid: i for i, rid in enumerate(train_ids)}
    cached = load_file(run.path("geometry") / "activations.safetensors")["last_token"]
    if a.calibration_over_refusal_per_task is not None:
        # the subspaces come from the same scarce rows the targets do, not from the whole split
        subset = calibration_rows(run)
        _, labels = load_responses(run)
        layer = geometry.layer
        geometry = estimate(
            cached[[position[r["id"]] for r in subset]].float(), [r["kind"] for r in subset], [r["task"] for r in subset],
            [refused(labels[r["id"]]) for r in subset], geometry.fingerprint, a.subspace_max_rank, a.subspace_variance,
        )
        geometry.layer = layer
    reference = cached[[position[r["id"]] for r in sft_rows]][:, layers]
    directions = torch.stack([geometry.direction(layer) for layer in layers])
    bases, means = {}, {}
    for task, per_layer in geometry.subspaces.items():
        chosen = [per_layer[layer] for layer in layers]
        if a.collapse_harmful_component:
            chosen = [torch.cat([geometry.direction(layer)[None], b]) for layer, b in zip(layers, chosen)]
        rank = max(len(b) for b in chosen)
        bases[task] = torch.stack([torch.cat([b, b.new_zeros(rank - len(b), b.shape[1])]) for b in chosen])
        means[task] = geometry.answered_means[task][layers]
    calibrate = set(a.resolved_calibrate_tasks())
    if a.regularizer_positions == "tail":
        model.eval()
        reference = capture_last_token(  # [rows, tail, layers, hidden]
            model, tokenizer, [r["prompt"] for r in sft_rows], layers, desc="reference: prompt tails",
            tail=template_tail_length(tokenizer),
        )
    return GeometryRegularizer(
        layers, directions, reference, [r["kind"] for r in sft_rows], [r["task"] for r in sft_rows],
        [r["kind"] == "over_refusal" and r["task"] in calibrate for r in sft_rows], bases, means,
    )


def sft_data_fits(folder: Path, objective: str) -> bool:
    """Whether training data built for one objective serves another: DPO needs its preference pairs, and
    target-free rows (geometry) differ from answered ones (sft, dpo)."""
    built = json.loads((folder / "targets.json").read_text()).get("objective", "sft")
    if objective == "dpo":
        return (folder / "preferences").is_dir()
    return (built == "geometry") == (objective == "geometry")


def stage_train(run: Run) -> None:
    """Distributed: TRL training with the regularizer; the adapter lands in run_dir/train."""
    if run.done("train"):
        return
    a, t = run.args, run.training_args
    dpo = a.objective == "dpo"
    if run.done("sft_data") and run.state.is_main_process and not sft_data_fits(run.path("sft_data"), a.objective):
        shutil.rmtree(run.path("sft_data"))  # built for another objective: build it again
    run.state.wait_for_everyone()
    run.main_only("sft_data", lambda: prepare_sft_data(run))
    model, tokenizer = run.load("float32", qlora=True)
    geometry = run.geometry_for(model)
    train_rows = load_from_disk(str(run.path("sft_data") / ("preferences" if dpo else "dataset"))).to_list()
    if a.objective == "geometry" and a.geometry_targets == "none":  # the regularizer alone: no row has a target
        train_rows = [{**row, "supervised": False} for row in train_rows]
    regularizer = build_regularizer(run, train_rows, geometry, model, tokenizer)
    onset = build_onset(tokenizer, train_rows, set(a.resolved_calibrate_tasks())) if a.onset_weight else None
    peft_config = get_peft_config(run.model_args)
    if a.init_adapter:  # retraining: continue the parent adapter
        check_adapter_base(a.init_adapter, geometry.fingerprint)
        model = PeftModel.from_pretrained(model, a.init_adapter, is_trainable=True)
        peft_config = None
    model.train()
    trainer_class = RefcalDPOTrainer if dpo else RefcalSFTTrainer
    trainer = trainer_class(
        model=model,
        args=dpo_config(t, a.dpo_beta, a.dpo_sft_weight) if dpo else t,
        train_dataset=preference_dataset(train_rows) if dpo else sft_dataset(train_rows),
        processing_class=tokenizer,
        data_collator=RowIndexCollator(tokenizer.pad_token_id, preference=dpo),
        peft_config=peft_config,
        regularizer=regularizer,
        weights={"keep": a.keep_weight, "collapse": a.collapse_weight, "retain": a.retain_weight, "onset": a.onset_weight},
        onset=onset,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    checkpoint = last_checkpoint(t.output_dir)
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.time() - started
    adapter = Path(t.output_dir) / "final-adapter"
    trainer.save_model(str(adapter))  # every process: FSDP and DeepSpeed gather sharded weights; the main one writes
    if run.state.is_main_process:
        (adapter / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # a pickle: adapters ship as safetensors and JSON only
        with atomic_directory(run.path("train")) as staging:
            shutil.move(adapter, staging / "adapter")
            (staging / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
            record = {
                "objective": a.objective, "regularizer_layers": regularizer.layers, "rows": len(train_rows),
                "base_weights": run.weights_description(True),
                "geometry_weights": geometry.info.get("weights", "unquantised"),
                "onset_tokens": None if onset is None else [tokenizer.decode([t]) for t in onset.onset_tokens.tolist()],
                "engine": engine_record(trainer, seconds, checkpoint_step(checkpoint)),
            }
            (staging / "train.json").write_text(json.dumps(record, indent=2))
    run.state.wait_for_everyone()


REQUIRES = {
    "organism": "data", "geometry": "data", "train": "geometry", "eval": "train", "export": "eval", "baselines": "geometry",
}
EXTRA_STAGES = ("baselines",)  # run on request, not by `refcal run`


def run_stages(run: Run, stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """Run the given stages in order, skipping finished ones; returns seconds spent per stage."""
    from refcal.train.baselines import stage_baselines
    from refcal.train.evaluate import stage_eval
    from refcal.train.export import stage_export

    work = {
        "data": lambda: run.main_only("data", lambda: stage_data(run)),
        "organism": lambda: stage_organism(run),
        "geometry": lambda: run.main_only("geometry", lambda: stage_geometry(run)),
        "train": lambda: stage_train(run),
        "eval": lambda: run.main_only("eval", lambda: stage_eval(run)),
        "export": lambda: run.main_only("export", lambda: stage_export(run)),
        "baselines": lambda: run.main_only("baselines", lambda: stage_baselines(run)),
    }
    if run.state.is_main_process:
        remove_stale_staging(run.dir, [*STAGES, *EXTRA_STAGES, "sft_data"])
    run.state.wait_for_everyone()
    seconds = {}
    for stage in stages:
        needed = REQUIRES.get(stage)
        if needed and needed not in stages and not run.done(needed):
            raise RuntimeError(f"stage {stage!r} needs stage {needed!r} first: run `refcal {needed}` with the same config")
        if stage == "geometry" and run.args.organism and not run.done("organism"):
            raise RuntimeError("this config builds an organism: run `refcal organism` with the same config first")
        ran = not run.done(stage)
        if ran and run.state.is_main_process:
            console.print(f"[bold]→ {stage}[/]")  # the stage starting; its bars follow, "✓ stage" ends it
        started = time.time()
        work[stage]()
        seconds[stage] = round(time.time() - started, 1)
        if ran and run.state.is_main_process:
            record_timing(run, stage, seconds[stage])
    return seconds


def record_timing(run: Run, stage: str, seconds: float) -> None:
    """run_dir/timings.json: wall seconds of each stage's last completed run (the benchmark's wall times)."""
    path = run.path("timings.json")
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = seconds
    atomic_write_text(path, json.dumps(timings, indent=2))
