"""Which loss terms a trainer builds and runs, what a step reads back from the device, and how the terms'
logged means reach the log."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows, tiny_training_settings
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from refcal.calibration.activations import backbone
from refcal.calibration.models import decoder_layers, load_model
from refcal.train.losses.onset import build_onset, onset_loss
from refcal.train.losses.regularizer import GeometryRegularizer
from refcal.train.losses.table import LossWeights
from refcal.train.losses.trainer import GeometryRegularized, RefcalSFTTrainer, RowIndexCollator
from refcal.train.stages.sft_data import sft_dataset
from refcal.train.stages.training import base_dtype

LAYERS = [1, 3]
CALIBRATE = {"sentiment", "translation"}


def first_batch(trainer) -> dict:
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def sft_trainer(model, tokenizer, rows, output_dir, weights: LossWeights, regularizer=None, onset=None, **overrides):
    """A RefcalSFTTrainer as stage_train builds one: only the modules its weights need."""
    model.train()
    return RefcalSFTTrainer(
        model=model,
        args=SFTConfig(**tiny_training_settings(output_dir, train_sampling_strategy="sequential", **overrides)),
        train_dataset=sft_dataset(rows),
        processing_class=tokenizer,
        data_collator=RowIndexCollator(tokenizer.pad_token_id),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        regularizer=regularizer,
        weights=weights,
        onset=onset,
    )


@pytest.fixture
def onset_alone(tiny_model_dir, tmp_path, monkeypatch):
    """A trainer given a regularizer but only the onset term's weight: the regularizer must never run."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential")
    # the first batch's over_refusal row is a sentiment row: left uncalibrated, it has no onset target
    trainer.onset = build_onset(tokenizer, rows, {"translation"}).to(trainer.accelerator.device)
    trainer.weights = LossWeights(onset=1.0)

    def never(*args, **kwargs):
        raise AssertionError("the geometry regularizer ran with its weights at 0")

    monkeypatch.setattr(GeometryRegularizer, "forward", never)
    monkeypatch.setattr(GeometryRegularizer, "counts", never)
    return trainer


@pytest.mark.slow
def test_terms_at_weight_zero_are_neither_hooked_nor_run(onset_alone):
    trainer = onset_alone
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    blocks = decoder_layers(unwrapped)
    before = [len(block._forward_hooks) for block in blocks]
    final_before = len(backbone(unwrapped)._forward_hooks)
    with trainer._capture(trainer.model):
        assert [len(block._forward_hooks) for block in blocks] == before  # no layer is hooked
        assert len(backbone(unwrapped)._forward_hooks) == final_before + 1  # the onset term reads the final state
    assert trainer.geometry_terms == () and list(trainer.output_terms) == ["onset"]
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert "loss/onset" in entry and not {"loss/keep", "loss/collapse", "loss/retain", "loss/distill"} & set(entry)


def test_the_onset_term_alone_adds_its_batch_mean_to_the_language_modelling_loss(onset_alone):
    """The loss is TRL's own plus the onset term's mean over the rows with a target, recomputed here from the
    model's own logits at the last prompt token."""
    trainer = onset_alone
    batch = first_batch(trainer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        language_modelling = SFTTrainer.compute_loss(trainer, trainer.model, inputs)
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    first = logits[torch.arange(len(batch["last_prompt"])), batch["last_prompt"]]
    target = trainer.onset.target[batch["row_index"]]
    rows = target >= 0
    assert 0 < rows.sum() < len(rows)  # some rows are out of the term (masked, not selected)
    onset = onset_loss(first[rows], trainer.onset.onset_tokens, target[rows]).mean()
    assert loss.item() == pytest.approx((language_modelling + onset).item(), rel=1e-5)
    assert language_modelling.item() > 0 and onset.item() > 0


@pytest.mark.slow
def test_a_trainer_needs_no_regularizer_without_geometry_terms(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    onset = build_onset(tokenizer, rows, CALIBRATE)
    trainer = sft_trainer(model, tokenizer, rows, tmp_path / "a", LossWeights(onset=1.0), onset=onset)
    assert trainer.regularizer is None
    trainer.train()
    assert all("loss/onset" in e and "loss/keep" not in e for e in trainer.state.log_history if "loss" in e)
    with pytest.raises(ValueError, match="no GeometryRegularizer"):
        sft_trainer(load_model(str(tiny_model_dir))[0], tokenizer, rows, tmp_path / "b", LossWeights(keep=1.0))


@pytest.mark.slow
def test_logged_terms_are_floats_and_the_mean_of_their_steps(tiny_model_dir, tmp_path):
    """Per-step means stay device tensors until the Trainer logs; each logged value is the float mean of the
    steps that had the term's rows (batches of 2 rows: some steps have no benign or no over_refusal row)."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    trainer = make_trainer(
        model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential",
        per_device_train_batch_size=2, max_steps=4, logging_steps=2,
    )  # fmt: skip
    trainer.onset = build_onset(tokenizer, rows, CALIBRATE).to(trainer.accelerator.device)
    trainer.weights = LossWeights(keep=1.0, collapse=1.0, retain=1.0, onset=1.0)
    pending: list[dict[str, list]] = []
    log = trainer.log

    def spy(logs, start_time=None):
        pending.append({k: list(v) for k, v in trainer._metrics["train"].items() if k.startswith("loss/")})
        log(logs, start_time)

    trainer.log = spy
    trainer.train()
    entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in entries] == [2, 4]
    skipped = 0
    for entry, steps in zip(entries, pending):
        assert set(steps) == {"loss/keep", "loss/collapse", "loss/retain", "loss/onset"}
        for key, values in steps.items():
            assert len(values) == 2 and all(torch.is_tensor(v) and v.dim() == 0 for v in values)
            present = [float(v) for v in values if not math.isnan(float(v))]
            skipped += len(values) - len(present)
            assert present, key  # every term has rows in one of the two batches
            assert type(entry[key]) is float and entry[key] == sum(present) / len(present), key
    assert skipped >= 2  # a batch without benign rows, one without over_refusal rows


@pytest.fixture
def reads(monkeypatch):
    """Counts the values read back from tensors (item, tolist, bool, float, int) inside `counted` calls."""
    state = {"depth": 0, "reads": []}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            if state["depth"]:
                state["reads"].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)

    def counted(cls, method: str):
        original = getattr(cls, method)

        def wrapper(*args, **kwargs):
            state["depth"] += 1
            try:
                return original(*args, **kwargs)
            finally:
                state["depth"] -= 1

        monkeypatch.setattr(cls, method, wrapper)

    state["counted"] = counted
    return state


@pytest.mark.slow
def test_a_step_reads_one_value_back_from_the_device(tiny_model_dir, tmp_path, reads):
    """Every term runs: the regularizer, the onset term and the labels' branch read nothing back; the
    finiteness check reads one value for the loss and all the terms together."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential")
    trainer.onset = build_onset(tokenizer, rows, CALIBRATE).to(trainer.accelerator.device)
    trainer.weights = LossWeights(keep=1.0, collapse=1.0, retain=1.0, onset=1.0)
    reads["counted"](GeometryRegularized, "_regularized")
    reads["counted"](RefcalSFTTrainer, "_any_process_has_labels")
    for method in ("_counts", "_reduce_sums"):  # the window's counts (the batches are collated on the host)
        reads["counted"](GeometryRegularized, method)
    trainer.train()
    assert reads["reads"] == ["__bool__", "__bool__"]  # one per step, two steps


@pytest.mark.slow
def test_capture_leaves_every_forward_unchanged(tiny_model_dir, tmp_path):
    """A capture hook returns nothing: a second forward inside the block (DPO's reference pass) computes
    its own states, not the captured ones of the first."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    trainer = make_trainer(model, tokenizer, rows, build_regularizer(model, tokenizer, rows, LAYERS), tmp_path)
    trainer.onset = build_onset(tokenizer, rows, CALIBRATE).to(trainer.accelerator.device)
    trainer.weights = LossWeights(keep=1.0, onset=1.0)
    batch = first_batch(trainer)
    first = {k: batch[k] for k in ("input_ids", "attention_mask")}
    second = {k: v.flip(0) for k, v in first.items()}  # other rows in each place, the same shape
    trainer.model.eval()
    with torch.no_grad():
        alone = trainer.model(**second).logits
        with trainer._capture(trainer.model) as captured:
            trainer.model(**first)
            inside = trainer.model(**second).logits
    assert set(captured) == {*LAYERS, "final"}
    assert torch.equal(inside, alone)


def test_base_weights_are_bf16_only_for_bf16_training_on_an_accelerator():
    def run(bf16: bool, use_cpu: bool, device: str):
        return SimpleNamespace(training_args=SimpleNamespace(bf16=bf16, use_cpu=use_cpu), device=torch.device(device))

    assert base_dtype(run(True, False, "cuda")) == "bfloat16"
    assert base_dtype(run(True, False, "cpu")) == "float32"
    assert base_dtype(run(True, True, "cuda")) == "float32"
    assert base_dtype(run(False, False, "cuda")) == "float32"


@pytest.mark.slow
def test_lora_weights_stay_fp32_on_a_bf16_base(tiny_model_dir, tmp_path):
    """PEFT upcasts the adapter of a bf16 base to fp32 (autocast_adapter_dtype), so a bf16 base halves the
    frozen weights and leaves the trained ones' precision alone."""
    model, tokenizer = load_model(str(tiny_model_dir), "bfloat16")
    rows = sft_rows()
    onset = build_onset(tokenizer, rows, CALIBRATE)
    trainer = sft_trainer(model, tokenizer, rows, tmp_path, LossWeights(onset=1.0), onset=onset, max_steps=1)
    trainer.train()
    parameters = dict(trainer.model.named_parameters())
    assert {p.dtype for n, p in parameters.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in parameters.items() if "lora_" not in n} == {torch.bfloat16}
    assert all(math.isfinite(e["loss/onset"]) for e in trainer.state.log_history if "loss" in e)


def test_each_loss_term_has_one_name_from_its_weight_field_to_its_logged_metric():
    """The table's rows: a config field `<name>_weight`, a module that computes the term, a metric `loss/<name>`;
    the weights a config sets are read through the table, and only the non-zero ones are active."""
    import importlib

    from refcal.train.config import RefcalArguments
    from refcal.train.losses.table import LOSS_TERMS, LossWeights

    fields = {spec.name for spec in dataclasses.fields(RefcalArguments)}
    for term in LOSS_TERMS:
        assert term.weight_field in fields and term.metric == f"loss/{term.name}"
        importlib.import_module(term.module)
    assert {term.name for term in LOSS_TERMS} == {spec.name for spec in dataclasses.fields(LossWeights)}
    args = RefcalArguments(onset_weight=1, distill_weight=0.5)
    weights = LossWeights.from_config(args)
    assert weights.active() == ("onset", "distill") and weights.of("distill") == 0.5 and not weights.uses_geometry
