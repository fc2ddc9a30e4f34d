"""The self-distillation guard: its KL over top-k tokens and a rest bucket, and what it holds in training."""

from __future__ import annotations

import pytest
import torch
from fixtures import build_regularizer, make_trainer, sft_rows

from refcal.calibration.activations import chat_prompts, encode_left_padded
from refcal.calibration.models import load_model
from refcal.train.losses.distill import FirstTokenDistill, bucket_kl, bucket_logprobs, build_distill
from refcal.train.losses.onset import build_onset
from refcal.train.losses.table import LossWeights

LAYERS = [1, 3]


def test_bucket_kl_is_zero_at_the_reference_and_exact_with_every_token_kept():
    g = torch.Generator().manual_seed(0)
    reference_logits, logits = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    guard = FirstTokenDistill.from_logprobs([True] * 3, reference_logits.log_softmax(-1), top_k=4)
    assert torch.allclose(bucket_kl(guard.reference, reference_logits, guard.tokens), torch.zeros(3), atol=1e-6)
    assert (bucket_kl(guard.reference, logits, guard.tokens) > 0).all()
    # every token kept: the rest bucket is empty and the KL is the full one
    everything = FirstTokenDistill.from_logprobs([True] * 3, reference_logits.log_softmax(-1), top_k=10)
    full = torch.nn.functional.kl_div(
        logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(bucket_kl(everything.reference, logits, everything.tokens), full, atol=1e-5)
    assert bucket_logprobs(logits, guard.tokens).exp().sum(-1).tolist() == pytest.approx([1.0] * 3, abs=1e-5)


def test_bucket_kl_gradient_survives_a_confident_reference():
    """A reference sure of its refusal (a 30-nat margin) still pulls a drifted model back."""
    reference = torch.zeros(1, 6)
    reference[0, 0] = 30.0
    guard = FirstTokenDistill.from_logprobs([True], reference.log_softmax(-1), top_k=2)
    drifted = torch.zeros(1, 6, requires_grad=True)
    bucket_kl(guard.reference, drifted, guard.tokens).sum().backward()
    assert drifted.grad[0, 0] < -0.5  # raise the refusal token's logit


def test_only_rows_that_must_stay_refused_are_guarded(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    guard = build_distill(model, tokenizer, rows)
    assert guard.guarded.tolist() == [r["kind"] in ("harmful", "frame_attack") for r in rows]
    index = torch.arange(len(rows))
    assert guard.count(index).item() == sum(guard.guarded.tolist())
    with pytest.raises(ValueError, match="no training row is harmful"):
        build_distill(model, tokenizer, [r for r in rows if r["kind"] == "benign"])


def harmful_drift(trainer, rows, guard: FirstTokenDistill) -> float:
    """Mean KL of the harmful rows' first-token distributions from the guard's reference."""
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows_ = torch.arange(len(batch["last_prompt"]))
    last = logits[rows_, batch["last_prompt"]]
    index = batch["row_index"]
    keep = guard.guarded[index]
    return float(bucket_kl(guard.reference[index[keep]], last[keep], guard.tokens[index[keep]]).mean())


@torch.no_grad()
def make_refusals_likely(model, tokenizer, rows, tokens: torch.Tensor) -> None:
    """An organism's habit for a random model: the onset tokens' logits raised along the mean final state at
    the last prompt token, so every row opens with a refusal about as often as not."""
    batch = encode_left_padded(tokenizer, chat_prompts(tokenizer, [r["prompt"] for r in rows]), model.device)
    final = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1].mean(0)
    model.get_output_embeddings().weight[tokens] += 10 * final / final.pow(2).sum()


def drift_after_onset_training(tiny_model_dir, output_dir, distill: float) -> float:
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = sft_rows()
    onset = build_onset(tokenizer, rows, {"sentiment", "translation"})
    make_refusals_likely(model, tokenizer, rows, onset.onset_tokens)
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    guard = build_distill(model, tokenizer, rows)
    trainer = make_trainer(
        model, tokenizer, rows, regularizer, output_dir, train_sampling_strategy="sequential", max_steps=20,
        learning_rate=1e-2,
    )  # fmt: skip
    onset.target[guard.guarded] = -1.0  # only "answer": nothing but the guard holds the harmful rows
    trainer.onset = onset.to(trainer.accelerator.device)
    trainer.distill = guard.to(trainer.accelerator.device)
    trainer.weights = LossWeights(onset=1.0, distill=distill)
    trainer.train_dataset = trainer.train_dataset.map(lambda _: {"supervised": False})  # the output terms alone
    trainer.train()
    logged = [entry["loss/distill"] for entry in trainer.state.log_history if "loss/distill" in entry]
    assert all(value > -1e-5 for value in logged)
    assert len(logged) == (20 if distill else 0)  # at weight 0 the guard is not run, so not logged
    return harmful_drift(trainer, rows, guard)


@pytest.mark.slow
def test_the_guard_holds_harmful_rows_while_the_onset_term_moves_the_model(tiny_model_dir, tmp_path):
    """The onset term pushing rows to answer moves every row's first token in a random model (its rows are
    nearly alike), harmful rows' too; with the guard beside it, the harmful rows' distributions stay nearer
    where they started."""
    unguarded = drift_after_onset_training(tiny_model_dir, tmp_path / "plain", distill=0.0)
    guarded = drift_after_onset_training(tiny_model_dir, tmp_path / "guarded", distill=1.0)
    assert unguarded > 0.01 and guarded < 0.5 * unguarded
