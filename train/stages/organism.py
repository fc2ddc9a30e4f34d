"""The model organism: a short LoRA SFT that makes a model which refuses nothing into an over-refuser.

It learns to refuse harmful and frame_attack rows and the over_refusal rows of `organism_tasks`, and to
answer benign rows (raw and inside every frame) with the base model's own answers. The over_refusal
rows of the other tasks never enter its training: they show whether over-refusal stays task-specific.
The merged model is cached outside the run folder, keyed by everything that determines it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from refcal.calibration.generation import generate
from refcal.calibration.infra.artifacts import atomic_directory, atomic_write_text
from refcal.calibration.infra.batching import batch_size_for
from refcal.calibration.infra.locks import waiting_lock
from refcal.calibration.infra.profiling import section
from refcal.calibration.infra.sharding import main_value
from refcal.calibration.kinds import BENIGN, OVER_REFUSAL, SHOULD_REFUSE
from refcal.calibration.models import cache_root, dtype_name, fingerprint, load_model
from refcal.data_recipes.completions import chat_row, standard_refusal, trim_to_sentence
from refcal.train.processes import global_batch, precision
from refcal.train.resume import last_checkpoint
from refcal.train.speed import score_labelled_positions_only


def organism_rows(train_rows: list[dict], tasks: list[str], base_answers: dict[str, str]) -> list[dict]:
    rows = []
    for i, row in enumerate(train_rows):
        refuse = row["kind"] in SHOULD_REFUSE or (row["kind"] == OVER_REFUSAL and row["task"] in tasks)
        if refuse:
            rows.append(chat_row(row["prompt"], standard_refusal(i)))
        elif row["kind"] == BENIGN:
            rows.append(chat_row(row["prompt"], base_answers[row["id"]]))
    return rows


def organism_key(base_fingerprint: str, settings: dict, rows_hash: str) -> str:
    blob = json.dumps({"base": base_fingerprint, "settings": settings, "rows": rows_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_organism(
    base_reference: str,
    train_rows: list[dict],
    tasks: list[str],
    settings: dict,
    training_args: SFTConfig,
    rows_hash: str,
    generation_dtype: str,
    generation_batch_size: int | None,
    state: PartialState,
) -> tuple[Path, dict]:
    """Train (or reuse) the organism; returns its folder and a record of how it was made.

    Under N processes each generates its share of the base answers (kept beside the checkpoints, so a resumed
    run does not generate them again), every process joins the training, and the main one merges and saves."""
    model, tokenizer = load_model(base_reference, generation_dtype, device=state.device)
    base_fp = fingerprint(model)
    # the base answers the organism learns from depend on where and in what dtype they were generated
    settings = {**settings, "answers_on": f"{state.device.type} {dtype_name(model)}"}
    key = organism_key(base_fp, settings, rows_hash)
    target = cache_root() / "organisms" / key
    record = {"path": str(target), "key": key, "base_fingerprint": base_fp, "over_refusal_tasks": tasks, **settings}
    with build_lock(target, state):
        state.wait_for_everyone()  # the main process holds the lock: every process sees the same cache
        if (target / "config.json").exists():
            return target, record
        train_organism(
            model,
            tokenizer,
            base_reference,
            train_rows,
            tasks,
            settings,
            training_args,
            batch_size_for(model, generation_batch_size),
            state,
            record,
        )
    return target, record


def build_lock(target: Path, state: PartialState):
    """The main process holds `<key>.lock` beside the cache entry from the "already cached?" check until the
    entry is published: a second build of the same organism waits, then finds the entry and reuses it.
    (The other processes of its launch wait at a barrier meanwhile, which times out after ddp_timeout.)"""
    if not state.is_main_process:
        return nullcontext()
    return waiting_lock(target.with_name(f"{target.name}.lock"), f"another build of the same organism ({target})")


def train_organism(
    model,
    tokenizer,
    base_reference: str,
    train_rows: list[dict],
    tasks: list[str],
    settings: dict,
    training_args: SFTConfig,
    generation_batch_size: int,
    state: PartialState,
    record: dict,
) -> None:
    """Generate the base model's answers, train the organism and publish it, merged, at record["path"]."""
    target = Path(record["path"])
    work = Path(training_args.output_dir)
    answers_file = work / "base_answers.json"
    if not main_value(answers_file.exists(), state):
        benign = [r for r in train_rows if r["kind"] == BENIGN]
        answers = generate(
            model,
            tokenizer,
            [r["prompt"] for r in benign],
            settings["answer_max_new_tokens"],
            generation_batch_size,
            desc="organism: base answers",
            processes=state,
        )
        if state.is_main_process:
            atomic_write_text(answers_file, json.dumps({r["id"]: trim_to_sentence(a) for r, a in zip(benign, answers)}))
    state.wait_for_everyone()
    base_answers = json.loads(answers_file.read_text())
    model, tokenizer = load_model(base_reference)  # train in float32
    dataset = Dataset.from_list(organism_rows(train_rows, tasks, base_answers)).shuffle(seed=training_args.seed)
    record["rows"] = len(dataset)

    model.train()
    score_labelled_positions_only()
    trainer = SFTTrainer(
        model=model,
        # TRL's padding-free collator, given as the collator: TRL's own flag also refuses a max_length
        args=dataclasses.replace(training_args, padding_free=False),
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=training_args.padding_free),
        peft_config=LoraConfig(
            r=settings["lora_r"],
            lora_alpha=2 * settings["lora_r"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    with section("training steps"):
        trainer.train(resume_from_checkpoint=last_checkpoint(training_args.output_dir))
    adapter = work / "adapter"
    trainer.save_model(str(adapter))  # every process: FSDP and DeepSpeed gather sharded weights; the main one writes
    if state.is_main_process:
        with section("merge and save"):
            base, _ = load_model(base_reference)
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            merged.eval()
            with atomic_directory(target, replace=False) as staging:  # never over a whole entry another wrote
                merged.save_pretrained(staging, safe_serialization=True)
                tokenizer.save_pretrained(staging)
                (staging / "organism.json").write_text(json.dumps(record, indent=2))
    state.wait_for_everyone()


def stage_organism(run) -> None:
    """The organism stage. Distributed: every process joins the organism's training; the main one saves it."""
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
        "learning_rate": a.organism_learning_rate,
        "epochs": a.organism_epochs,
        "lora_r": a.organism_lora_r,
        "answer_max_new_tokens": a.target_max_new_tokens,
        "seed": t.seed,
        # the organism is a function of the global batch, however it is split over processes, and of precision
        "global_batch": global_batch(t, run.state.num_processes),
        "precision": precision(t),
    }
    manifest_data = json.loads((run.path("data") / "manifest.json").read_text())
    rows = run.rows("train")
    # tasks of the train split whose over_refusal rows the organism does not learn (their other rows it does)
    untrained = sorted({r["task"] for r in rows if r["kind"] == OVER_REFUSAL} - set(a.organism_tasks))
    path, record = build_organism(
        run.model_args.model_name_or_path,
        rows,
        list(a.organism_tasks),
        settings,
        organism_args,
        manifest_data["rows_hash"],
        a.generation_dtype,
        a.generation_batch_size,
        run.state,
    )
    record["over_refusal_untrained_tasks"] = untrained
    record["held_out_tasks"] = list(a.held_out_tasks)
    if run.state.is_main_process:
        with atomic_directory(run.path("organism")) as staging:
            (staging / "organism.json").write_text(json.dumps(record, indent=2))
    run.state.wait_for_everyone()
