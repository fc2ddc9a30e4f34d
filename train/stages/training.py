"""The train stage: TRL training (SFT or DPO) with the geometry regularizer, resumable from the Trainer's
last checkpoint; the adapter and the training record land in run_dir/train."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import PeftModel
from safetensors.torch import load_file
from transformers.trainer import TRAINING_ARGS_NAME
from trl.trainer.utils import get_peft_config

from refcal.calibration.activations import capture_last_token, template_tail_length
from refcal.calibration.geometry.directions import Geometry, estimate
from refcal.calibration.infra.artifacts import atomic_directory
from refcal.calibration.infra.profiling import section
from refcal.calibration.judges.phrases import refused
from refcal.calibration.kinds import OVER_REFUSAL
from refcal.train.config import dpo_config
from refcal.train.losses.distill import build_distill
from refcal.train.losses.live_direction import LiveDirection
from refcal.train.losses.onset import build_onset
from refcal.train.losses.regularizer import GeometryRegularizer
from refcal.train.losses.table import LossWeights
from refcal.train.losses.trainer import RefcalDPOTrainer, RefcalSFTTrainer, RowIndexCollator
from refcal.train.processes import LoggedPace, engine_record, shards_weights
from refcal.train.resume import checkpoint_step, last_checkpoint
from refcal.train.retrain import check_adapter_base
from refcal.train.speed import score_labelled_positions_only
from refcal.train.stages.geometry import load_responses
from refcal.train.stages.sft_data import (
    calibration_rows,
    preference_dataset,
    prepare_sft_data,
    sft_data_fits,
    sft_dataset,
)


def build_regularizer(run, sft_rows: list[dict], geometry: Geometry, model=None, tokenizer=None) -> GeometryRegularizer:
    """The regularizer's references: the geometry run's cached last-token activations, or (positions:
    tail) the frozen `model`'s activations at each row's post-instruction tokens, captured here."""
    a = run.args
    layers = a.regularizer_layers or (
        list(range(geometry.layer, len(geometry.harmful))) if a.regularizer_layers_to_last else [geometry.layer]
    )
    train_ids = [r["id"] for r in run.rows("train")]
    position = {rid: i for i, rid in enumerate(train_ids)}
    cached = load_file(run.path("geometry") / "activations.safetensors")["last_token"]
    if a.calibration_over_refusal_per_task is not None:
        # the subspaces come from the same scarce rows the targets do, not from the whole split
        subset = calibration_rows(run)
        _, labels = load_responses(run)
        layer = geometry.layer
        geometry = estimate(
            cached[[position[r["id"]] for r in subset]].float(),
            [r["kind"] for r in subset],
            [r["task"] for r in subset],
            [refused(labels[r["id"]]) for r in subset],
            geometry.fingerprint,
            a.subspace_max_rank,
            a.subspace_variance,
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
            model,
            tokenizer,
            [r["prompt"] for r in sft_rows],
            layers,
            desc="reference: prompt tails",
            tail=template_tail_length(tokenizer),
        )
    return GeometryRegularizer(
        layers,
        directions,
        reference,
        [r["kind"] for r in sft_rows],
        [r["task"] for r in sft_rows],
        [r["kind"] == OVER_REFUSAL and r["task"] in calibrate for r in sft_rows],
        bases,
        means,
        keep_down=a.keep_rows == "all",
    )


def base_dtype(run) -> str:
    """The frozen base weights' dtype: bf16 where training computes in bf16 on an accelerator (halving their
    memory and reads; PEFT still keeps the LoRA weights in fp32, as its autocast_adapter_dtype does by
    default), float32 on the CPU."""
    t = run.training_args
    return "bfloat16" if t.bf16 and not t.use_cpu and run.device.type != "cpu" else "float32"


def stage_train(run) -> None:
    """Distributed: TRL training with the regularizer; the adapter lands in run_dir/train."""
    if run.done("train"):
        return
    a, t = run.args, run.training_args
    dpo = a.objective == "dpo"
    if run.done("sft_data") and run.state.is_main_process and not sft_data_fits(run.path("sft_data"), a.objective):
        shutil.rmtree(run.path("sft_data"))  # built for another objective: build it again
    run.state.wait_for_everyone()
    run.every_process("sft_data", lambda: prepare_sft_data(run))
    # on the device for the references built before training (regularizer, distill); FSDP and DeepSpeed shard
    # the model from the CPU themselves
    model, tokenizer = run.load(base_dtype(run), qlora=True, on_device=not shards_weights(run.state))
    geometry = run.geometry_for(model)
    train_rows = load_from_disk(str(run.path("sft_data") / ("preferences" if dpo else "dataset"))).to_list()
    if a.objective == "target_free" and a.geometry_targets == "none":  # the regularizer alone: no row has a target
        train_rows = [{**row, "supervised": False} for row in train_rows]
    weights = LossWeights.from_config(a)
    regularizer = None  # only a geometry term in the loss needs its references (and the live direction, keep)
    if weights.uses_geometry:
        with section("regularizer references"):
            regularizer = build_regularizer(run, train_rows, geometry, model, tokenizer)
    calibrate = set(a.resolved_calibrate_tasks())
    onset = build_onset(tokenizer, train_rows, calibrate, a.onset_min_refusal_share) if weights.onset else None
    peft_config = get_peft_config(run.model_args)
    if a.init_adapter:  # retraining: continue the parent adapter
        check_adapter_base(a.init_adapter, geometry.fingerprint)
        model = PeftModel.from_pretrained(model, a.init_adapter, is_trainable=True)
        peft_config = None
    with section("self-distillation references"):  # the model as training starts: the organism, or the parent adapter
        distill = build_distill(model, tokenizer, train_rows) if weights.distill else None
    model.train()
    score_labelled_positions_only()
    trainer_class = RefcalDPOTrainer if dpo else RefcalSFTTrainer
    trainer = trainer_class(
        model=model,
        # padding-free batches come from refcal's collator: TRL refuses its own flag beside a custom collator
        args=dpo_config(t, a.dpo_beta, a.dpo_sft_weight) if dpo else dataclasses.replace(t, padding_free=False),
        train_dataset=preference_dataset(train_rows) if dpo else sft_dataset(train_rows),
        processing_class=tokenizer,
        data_collator=RowIndexCollator(tokenizer.pad_token_id, preference=dpo, padding_free=t.padding_free),
        peft_config=peft_config,
        regularizer=regularizer,
        weights=weights,
        onset=onset,
        distill=distill,
    )
    if a.keep_direction == "live" and weights.keep:  # it moves the keep term alone: nothing to move at weight 0
        trainer.add_callback(LiveDirection(trainer.regularizer, tokenizer, train_rows, a.keep_refresh_steps))
    trainer.add_callback(pace := LoggedPace())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    checkpoint = last_checkpoint(t.output_dir)
    started = time.time()
    with section("training steps"):
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
                "objective": a.objective,
                "regularizer_layers": None if regularizer is None else regularizer.layers,
                "base_dtype": base_dtype(run),
                "rows": len(train_rows),
                "base_weights": run.weights_description(True),
                "geometry_weights": geometry.info.get("weights", "unquantised"),
                "onset_tokens": None if onset is None else [tokenizer.decode([t]) for t in onset.onset_tokens.tolist()],
                "distill_rows": None if distill is None else int(distill.guarded.sum()),
                "keep_direction": a.keep_direction,
                "engine": engine_record(trainer, seconds, checkpoint_step(checkpoint), pace),
            }
            (staging / "train.json").write_text(json.dumps(record, indent=2))
    run.state.wait_for_everyone()
