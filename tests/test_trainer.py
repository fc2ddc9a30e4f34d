"""RefcalSFTTrainer on the tiny model: positions match the capture, LoRA-only gradients, logged terms."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import assert_terms_at_reference, build_regularizer, make_trainer, sft_rows

from refcal.calibration.models import load_model
from refcal.train.losses.table import LossWeights
from refcal.train.losses.trainer import ANY_SUPERVISED, GEOMETRY_TERMS, RowIndexCollator, last_prompt_positions

LAYERS = [1, 3]


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential")
    return trainer, rows


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_terms_at_step_zero_match_the_reference(setup):
    """Before any update, the trainer's hidden states at the last prompt token equal the capture's."""
    trainer, rows = setup
    batch = first_batch(trainer)
    assert batch["row_index"].tolist() == [0, 1, 2, 3]
    positions = last_prompt_positions(batch["labels"] != -100)
    assert batch["last_prompt"].tolist() == positions.tolist()
    # the position is the last token of the rendered prompt (generation prompt included)
    for i, pos in enumerate(positions.tolist()):
        assert batch["labels"][i, pos].item() == -100 and batch["labels"][i, pos + 1].item() != -100
    assert_terms_at_reference(trainer, batch)


def test_shifted_positions_would_be_caught(setup):
    """The step-0 check is sensitive: one token off, the hidden states no longer match the reference."""
    trainer, rows = setup
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, {**batch, "last_prompt": batch["last_prompt"] + 1})
    metrics = trainer._metrics["eval"]
    assert metrics["loss/retain"][-1] > 1e-3 or abs(metrics["loss/collapse"][-1] - 1) > 1e-3


def test_gradients_only_on_lora_parameters(setup):
    trainer, rows = setup
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    lora_nonzero = 0
    for name, parameter in trainer.model.named_parameters():
        if "lora_" in name:
            assert parameter.requires_grad, name
            if parameter.grad is not None and parameter.grad.abs().sum() > 0:
                lora_nonzero += 1
        else:
            assert parameter.grad is None or parameter.grad.abs().sum().item() == 0, name
    assert lora_nonzero > 0


def test_regularizer_gradient_reaches_lora(setup):
    """With the SFT loss out of the picture, the regularizer alone still trains the adapter."""
    trainer, rows = setup
    batch = first_batch(trainer)
    trainer.model.train()
    for name, parameter in trainer.model.named_parameters():
        if "lora_A" in name:
            with torch.no_grad():
                parameter.normal_(0, 0.1)
        if "lora_B" in name:
            with torch.no_grad():
                parameter.normal_(0, 0.1)  # move off the reference so keep/retain have gradients
    trainer.model.zero_grad()
    full = trainer.compute_loss(trainer.model, dict(batch))
    trainer.weights = LossWeights()
    sft_only = trainer.compute_loss(trainer.model, dict(batch))
    assert not math.isclose(full.item(), sft_only.item(), rel_tol=1e-6)
    (full - sft_only).backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_" in n
    )


@pytest.mark.slow
def test_train_logs_every_term_every_step(setup):
    trainer, rows = setup
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:
        assert "loss/onset" not in entry  # no onset term was given
        for term in GEOMETRY_TERMS:
            assert f"loss/{term}" in entry, (term, entry)
            assert math.isfinite(entry[f"loss/{term}"])
        assert math.isfinite(entry["loss"])
    # step 1 is computed before any update: the reference values
    assert steps[0]["loss/keep"] == pytest.approx(0.0, abs=1e-4)
    assert steps[0]["loss/collapse"] == pytest.approx(1.0, abs=1e-4)
    assert steps[0]["loss/retain"] == pytest.approx(0.0, abs=1e-4)
    # after one update on a random tiny model the hidden states moved
    assert steps[1]["loss/retain"] > 0


@pytest.mark.parametrize("supervised", [True, False])
@pytest.mark.slow
def test_a_padding_free_batch_trains_as_the_padded_one(tiny_model_dir, tmp_path, supervised):
    """The same rows laid end to end in one sequence: the same loss, terms and gradients as padded (the rows
    do not attend to each other, and every row's last prompt token is found), with or without answer targets."""
    from refcal.train.losses.onset import build_onset

    model, tokenizer = load_model(str(tiny_model_dir))
    rows = [{**r, "supervised": supervised or r["kind"] != "over_refusal"} for r in sft_rows()]
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    results = []
    for padding_free in (False, True):
        torch.manual_seed(0)
        trainer = make_trainer(
            load_model(str(tiny_model_dir))[0], tokenizer, rows, regularizer, tmp_path / str(padding_free),
            train_sampling_strategy="sequential", padding_free=padding_free,
        )  # fmt: skip
        trainer.onset = build_onset(tokenizer, rows, {"sentiment"}).to(trainer.accelerator.device)
        trainer.weights = LossWeights(keep=1.0, collapse=1.0, retain=1.0, onset=1.0)
        batch = first_batch(trainer)
        assert batch["input_ids"].shape[0] == (1 if padding_free else 4)
        if padding_free:
            assert_terms_at_reference(trainer, batch)
        trainer.model.train()
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        grads = [p.grad.clone() for n, p in sorted(trainer.model.named_parameters()) if "lora_B" in n]
        terms = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if k.startswith("loss/")}
        results.append((loss.item(), terms, grads))
    (padded_loss, padded_terms, padded_grads), (free_loss, free_terms, free_grads) = results
    assert free_loss == pytest.approx(padded_loss, rel=1e-4)
    assert free_terms.keys() == padded_terms.keys() and "loss/onset" in free_terms
    for term, value in padded_terms.items():
        assert free_terms[term] == pytest.approx(value, rel=1e-4, abs=1e-6), term
    for free, padded in zip(free_grads, padded_grads):
        assert (free - padded).abs().max() <= 1e-4 * padded.abs().max()


def test_last_prompt_positions_rejects_rows_without_completion():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, -100]])
    with pytest.raises(ValueError, match="no completion tokens"):
        last_prompt_positions(labels != -100)
    assert last_prompt_positions(labels[:1] != -100).tolist() == [1]


@pytest.fixture
def target_free(tiny_model_dir, tmp_path):
    """objective: target_free's rows: over_refusal rows carry a completion but no answer target."""
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = [{**r, "supervised": r["kind"] != "over_refusal"} for r in sft_rows()]
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential")
    return trainer, rows


def test_target_free_rows_have_no_labels_but_keep_their_position(target_free):
    trainer, rows = target_free
    batch = first_batch(trainer)
    supervised = [rows[i]["supervised"] for i in batch["row_index"].tolist()]
    assert supervised.count(False) >= 1
    for i, has_target in enumerate(supervised):
        assert (batch["labels"][i] != -100).any().item() == has_target
    # the position still is the last prompt token, as for the answered rows (the step-0 reference match)
    assert_terms_at_reference(trainer, batch)


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_collator_says_on_the_host_whether_a_batch_has_answer_targets(target_free, padding_free):
    trainer, rows = target_free
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    collator = RowIndexCollator(trainer.processing_class.pad_token_id, padding_free=padding_free)
    mixed = collator(examples[:4])
    unsupervised = collator([e for e in examples if not e["supervised"]])
    assert mixed[ANY_SUPERVISED] is True and (mixed["labels"] != -100).any()
    assert unsupervised[ANY_SUPERVISED] is False and not (unsupervised["labels"] != -100).any()


def test_a_batch_of_target_free_rows_trains_through_the_regularizer_alone(target_free):
    trainer, rows = target_free
    batch = first_batch(trainer)
    only = [i for i, r in enumerate(batch["row_index"].tolist()) if not rows[r]["supervised"]]
    # the rows' own flags travel with the batch, so the branch is taken without reading the labels back
    batch = {**{k: v[only] for k, v in batch.items() if torch.is_tensor(v)}, ANY_SUPERVISED: False}
    trainer.model.train()
    for name, parameter in trainer.model.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                parameter.normal_(0, 0.1)  # off the reference, so the collapse term has a gradient
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_" in n
    )


def test_template_tail_is_the_post_instruction_tokens(tokenizer):
    from refcal.calibration.activations import template_tail_length

    tail = template_tail_length(tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # SmolLM2's template: "<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n" follow the message
    assert tail == 6
    assert tokenizer.decode(ids[-tail:]) == "<|im_end|>\n<|im_start|>assistant\n"


def test_tail_positions_match_their_references_at_step_zero(tiny_model_dir, tmp_path):
    """At every post-instruction token, not only the last, the trainer reads the state the capture saw."""
    from refcal.calibration.activations import template_tail_length

    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    span = template_tail_length(tokenizer)
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS, tail=span)
    assert regularizer.positions == span and len(regularizer.kind) == span * len(rows)
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential")
    batch = first_batch(trainer)
    assert_terms_at_reference(trainer, batch)
    trainer.model.eval()
    with torch.no_grad():  # one token early, the references no longer match
        trainer.compute_loss(trainer.model, {**batch, "last_prompt": batch["last_prompt"] - 1})
    assert trainer._metrics["eval"]["loss/retain"][-1] > 1e-3


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_adapter_bytes(tiny_model_dir, tmp_path):
    """Reproducibility on CPU: two runs with one seed write byte-identical adapters, whatever ran before."""
    adapters = []
    for attempt in range(2):
        torch.manual_seed(1000 + attempt)  # a different global RNG state before each run
        model, tokenizer = load_model(str(tiny_model_dir))
        rows = sft_rows()
        trainer = make_trainer(
            model, tokenizer, rows, build_regularizer(model, tokenizer, rows, LAYERS), tmp_path / f"out{attempt}"
        )
        trainer.train()
        trainer.model.save_pretrained(tmp_path / f"adapter{attempt}", safe_serialization=True)
        adapters.append((tmp_path / f"adapter{attempt}" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]


def test_non_finite_loss_stops_training_before_the_update(setup):
    trainer, _ = setup
    lora = [p for name, p in trainer.model.named_parameters() if "lora_A" in name]
    before = [p.detach().clone() for p in lora]
    with torch.no_grad():
        trainer.model.get_input_embeddings().weight[:] = float("nan")  # every activation, and the loss, NaN
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 1"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, lora))  # no optimizer step spread it
