"""The refusal-onset term: its loss alone, the choice of onset tokens, and its place in the trainer."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows

from refcal.calibration.models import load_model
from refcal.train.losses.onset import (
    RefusalOnset,
    build_onset,
    first_completion_token,
    onset_loss,
    select_onset_tokens,
    split_vocabulary,
)
from refcal.train.losses.table import LossWeights

LAYERS = [1, 3]


def test_onset_loss_is_the_cross_entropy_of_the_onset_mass():
    logits = torch.zeros(2, 4)  # uniform: p = 2/4 on tokens {0, 1}
    loss = onset_loss(logits, torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))
    assert loss.tolist() == pytest.approx([math.log(2), math.log(2)])
    sure = torch.tensor([[30.0, 0.0, 0.0, 0.0]])  # p ~ 1: cheap to keep refusing, dear to answer, never inf
    assert onset_loss(sure, torch.tensor([0]), torch.tensor([1.0])).item() < 1e-6
    # -log(1 - p) = log((e^30 + 3) / 3), about 30 - log 3: large, finite, exact
    assert onset_loss(sure, torch.tensor([0]), torch.tensor([0.0])).item() == pytest.approx(30 - math.log(3), abs=1e-4)


@pytest.mark.parametrize("margin", [30.0, 80.0])
def test_onset_loss_gradient_never_vanishes_on_confident_refusals(margin):
    """A row refused with a margin of many nats still pulls towards answering: the most confidently refused
    rows are the ones the term is for."""
    logits = torch.zeros(1, 4)
    logits[0, 0] = margin
    logits.requires_grad_()
    onset_loss(logits, torch.tensor([0]), torch.tensor([0.0])).sum().backward()
    assert logits.grad[0, 0].item() == pytest.approx(1.0, abs=1e-4)  # d(-log(1 - p))/d(onset logit) -> 1
    assert (logits.grad[0, 1:] < -0.3).all()


def test_onset_loss_gradient_lowers_the_onset_logits_of_rows_that_should_answer():
    logits = torch.zeros(1, 5, requires_grad=True)
    onset_loss(logits, torch.tensor([2]), torch.tensor([0.0])).sum().backward()
    assert logits.grad[0, 2] > 0 and (logits.grad[0, [0, 1, 3, 4]] < 0).all()  # descent lowers token 2


def test_the_onset_split_reads_what_a_vocabulary_mask_selects():
    """Token ids, or the split built from them once, give the loss a [vocab] mask's selection gives, exactly."""
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(5, 50, generator=g)
    tokens = torch.tensor([7, 3, 3, 41])  # unsorted, with a repeat
    onset, others = split_vocabulary(tokens, 50)
    assert onset.tolist() == [3, 7, 41] and others.tolist() == [i for i in range(50) if i not in (3, 7, 41)]
    mask = torch.zeros(50, dtype=torch.bool)
    mask[tokens] = True
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    log_partition = logits.logsumexp(-1)
    selected = -(
        target * (logits[:, mask].logsumexp(-1) - log_partition)
        + (1 - target) * (logits[:, ~mask].logsumexp(-1) - log_partition)
    )
    assert torch.equal(onset_loss(logits, tokens, target), selected)
    assert torch.equal(onset_loss(logits, (onset, others), target), selected)


def test_refusal_onset_splits_its_vocabulary_once_and_masks_rows_without_a_target(monkeypatch):
    from refcal.train.losses import onset as onset_module

    kinds = ["harmful", "benign", "over_refusal", "over_refusal", "harmful"]
    module = RefusalOnset([41, 3, 7], kinds, [False, False, True, False, False])  # row 3: no target
    splits = []
    split = onset_module.split_vocabulary
    monkeypatch.setattr(onset_module, "split_vocabulary", lambda *args: splits.append(args) or split(*args))
    logits = (4 * torch.randn(5, 50, generator=torch.Generator().manual_seed(1))).requires_grad_()
    rows = torch.tensor([0, 1, 2, 3, 4])
    (total, count), again = module(logits, rows), module(logits, rows)
    assert len(splits) == 1 and module.onset_ids.tolist() == [3, 7, 41] and len(module.other_ids) == 47
    assert torch.equal(again[0], total) and count.item() == 4
    kept = torch.tensor([0, 1, 2, 4])
    expected = onset_loss(logits[kept], torch.tensor([3, 7, 41]), module.target[kept]).sum()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert logits.grad[3].abs().sum() == 0 and logits.grad[kept].abs().sum() > 0  # the masked row adds nothing
    splits.clear()
    module.vocabulary(60)  # another vocabulary size: split again
    assert len(splits) == 1 and len(module.other_ids) == 57


def rows_with(refusals: list[str], answers: list[str]) -> list[dict]:
    rows = [
        {"prompt": f"harmful {i}", "kind": "harmful", "task": "none", "completion_text": t}
        for i, t in enumerate(refusals)
    ]
    return rows + [
        {"prompt": f"benign {i}", "kind": "benign", "task": "none", "completion_text": t} for i, t in enumerate(answers)
    ]


def test_onset_tokens_open_refusals_and_rarely_answers(tokenizer):
    refusals = ["I'm sorry, I can't.", "I cannot do that.", "Sorry, no.", "Sorry, I won't.", "I can't help."]
    answers = ["Sure: Paris.", "The answer is 4.", "Here it is.", "Paris is the capital.", "Sure, here."]
    chosen = {tokenizer.decode([t]) for t in select_onset_tokens(tokenizer, rows_with(refusals, answers))}
    assert chosen == {"I", "Sorry"}
    # once answers open with "I" as often as refusals do, "I" no longer marks a refusal
    chosen = {
        tokenizer.decode([t])
        for t in select_onset_tokens(tokenizer, rows_with(refusals, [*answers, "I think so.", "I like it.", "I see."]))
    }
    assert chosen == {"Sorry"}


def test_no_distinctive_onset_token_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="onset_weight 0"):
        select_onset_tokens(tokenizer, rows_with(["Sure, but no."], ["Sure, yes."]))


def test_first_completion_token_is_the_one_after_the_generation_prompt(tokenizer):
    token = first_completion_token(tokenizer, "Hi", "Sorry, no.")
    assert tokenizer.decode([token]) == "Sorry"


def test_targets_by_kind():
    onset = RefusalOnset(
        [0], ["harmful", "frame_attack", "benign", "over_refusal", "over_refusal"], [False, False, False, True, False]
    )
    assert onset.target.tolist() == [1.0, 1.0, 0.0, 0.0, -1.0]  # an uncalibrated task's row gets no term


@pytest.fixture
def onset_trainer(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    onset = build_onset(tokenizer, rows, {"sentiment", "translation"})
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path / "out", train_sampling_strategy="sequential")
    trainer.onset = onset.to(trainer.accelerator.device)
    trainer.weights = dataclasses.replace(trainer.weights, onset=1.0)  # at weight 0 it would not run
    return trainer, rows, tokenizer


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_onset_logits_are_the_models_own_next_token_logits(onset_trainer):
    """Through TRL's fused LM head the term rebuilds the logits at the last prompt token from the final
    hidden state: they must equal the model's own logits there (one token off, they do not)."""
    trainer, rows, _ = onset_trainer
    batch = first_batch(trainer)
    trainer.model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), trainer._capture(trainer.model) as captured:
        own = trainer.model(**inputs).logits
    rows_ = torch.arange(len(batch["last_prompt"]))
    rebuilt = trainer._first_answer_logits(trainer.model, captured["final"], batch["last_prompt"])
    assert torch.allclose(rebuilt, own[rows_, batch["last_prompt"]], atol=1e-4)
    assert not torch.allclose(rebuilt, own[rows_, batch["last_prompt"] - 1], atol=1e-2)


@pytest.mark.slow
def test_the_onset_term_alone_moves_refusal_onset_the_right_way(onset_trainer):
    """With every other loss off, training on the onset term teaches the model to open over_refusal rows
    with a refusal far less often than harmful rows, as its own next-token distribution shows. The random model first
    gets an organism's habit: its onset tokens' logits are raised along the mean last-prompt state, so
    every row starts about equally likely to open with a refusal."""
    trainer, rows, tokenizer = onset_trainer
    batch = first_batch(trainer)
    with torch.no_grad(), trainer._capture(trainer.model) as captured:
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        final = captured["final"][torch.arange(len(batch["last_prompt"])), batch["last_prompt"]].mean(0)
        trainer.model.get_output_embeddings().weight[trainer.onset.onset_tokens] += 10 * final / final.pow(2).sum()
    trainer.weights = LossWeights(onset=1.0)
    trainer.train_dataset = trainer.train_dataset.map(lambda _: {"supervised": False})  # no language-modelling loss
    trainer.args.max_steps = 30
    trainer.args.learning_rate = 1e-2

    def onset_mass(kind: str) -> float:
        trainer.model.eval()
        with torch.no_grad():
            logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        chosen = [i for i, r in enumerate(batch["row_index"].tolist()) if rows[r]["kind"] == kind]
        last = logits[chosen, batch["last_prompt"][chosen]].softmax(-1)
        return float(last[:, trainer.onset.onset_tokens].sum(-1).mean())

    before = {kind: onset_mass(kind) for kind in ("harmful", "over_refusal")}
    trainer.train()
    after = {kind: onset_mass(kind) for kind in ("harmful", "over_refusal")}
    assert 0.1 < before["over_refusal"] < 0.9 and before["harmful"] < 1.5 * before["over_refusal"]
    # the rows' states are nearly alike in a random model, so the two kinds are told apart, not both moved
    assert after["over_refusal"] < before["over_refusal"] / 2 and after["harmful"] > 3 * after["over_refusal"]
    logged = [e["loss/onset"] for e in trainer.state.log_history if "loss/onset" in e]
    assert len(logged) == 30 and logged[-1] < logged[0]
