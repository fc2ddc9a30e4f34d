"""The model organism: a short LoRA SFT that makes a model which refuses nothing into an over-refuser.

It learns to refuse harmful and frame_attack rows and the over_refusal rows of `organism_tasks`, and to
answer benign rows (raw and inside every frame) with the base model's own answers. The over_refusal
rows of the other tasks never enter its training: they show whether over-refusal stays task-specific.
The merged model is cached outside the run folder, keyed by everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig, PeftModel
from trl import SFTConfig, SFTTrainer

from refcal.calibration.artifacts import atomic_directory, atomic_write_text
from refcal.calibration.generation import generate
from refcal.calibration.models import cache_root, fingerprint, load_model
from refcal.data_recipes.targets import chat_row, standard_refusal, trim_to_sentence
from refcal.train.processes import waiting_processes_threads
from refcal.train.resume import last_checkpoint


def organism_rows(train_rows: list[dict], tasks: list[str], base_answers: dict[str, str]) -> list[dict]:
    rows = []
    for i, row in enumerate(train_rows):
        refuse = row["kind"] in ("harmful", "frame_attack") or (row["kind"] == "over_refusal" and row["task"] in tasks)
        if refuse:
            rows.append(chat_row(row["prompt"], standard_refusal(i)))
        elif row["kind"] == "benign":
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
    generation_batch_size: int,
    state: PartialState,
) -> tuple[Path, dict]:
    """Train (or reuse) the organism; returns its folder and a record of how it was made.

    Under N processes the main one generates the base answers (kept beside the checkpoints, so a resumed
    run does not generate them again), every process joins the training, and the main one merges and saves."""
    model, tokenizer = load_model(base_reference, generation_dtype)
    base_fp = fingerprint(model)
    key = organism_key(base_fp, settings, rows_hash)
    target = cache_root() / "organisms" / key
    record = {"path": str(target), "key": key, "base_fingerprint": base_fp, "over_refusal_tasks": tasks, **settings}
    if (target / "config.json").exists():
        return target, record

    work = Path(training_args.output_dir)
    answers_file = work / "base_answers.json"
    if state.is_main_process and not answers_file.exists():
        benign = [r for r in train_rows if r["kind"] == "benign"]
        with waiting_processes_threads(state):
            answers = generate(
                model, tokenizer, [r["prompt"] for r in benign], settings["answer_max_new_tokens"], generation_batch_size,
                desc="organism: base answers",
            )
        atomic_write_text(answers_file, json.dumps({r["id"]: trim_to_sentence(a) for r, a in zip(benign, answers)}))
    state.wait_for_everyone()
    base_answers = json.loads(answers_file.read_text())
    model, tokenizer = load_model(base_reference)  # train in float32
    dataset = Dataset.from_list(organism_rows(train_rows, tasks, base_answers)).shuffle(seed=training_args.seed)
    record["rows"] = len(dataset)

    model.train()
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=settings["lora_r"], lora_alpha=2 * settings["lora_r"], lora_dropout=0.0, target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    trainer.train(resume_from_checkpoint=last_checkpoint(training_args.output_dir))
    adapter = work / "adapter"
    trainer.save_model(str(adapter))  # every process: FSDP and DeepSpeed gather sharded weights; the main one writes
    if state.is_main_process:
        base, _ = load_model(base_reference)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        merged.eval()
        with atomic_directory(target) as staging:
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / "organism.json").write_text(json.dumps(record, indent=2))
    state.wait_for_everyone()
    return target, record
