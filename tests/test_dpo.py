"""RefcalDPOTrainer on the tiny model (positions match the capture; the regularizer and DPO both act) and
the preference pairs built from SFT targets."""

from __future__ import annotations

import pytest
import torch
from fixtures import assert_terms_at_reference, build_regularizer, sft_rows, tiny_training_settings
from peft import LoraConfig

from refcal.calibration.judges.phrases import PhraseJudge
from refcal.calibration.models import load_model
from refcal.train.config import dpo_config
from refcal.train.losses.onset import build_onset
from refcal.train.losses.table import LossWeights
from refcal.train.losses.trainer import RefcalDPOTrainer, RowIndexCollator, last_prompt_positions
from refcal.train.stages.sft_data import build_preferences, preference_dataset

LAYERS = [1, 3]
REFUSAL = "I'm sorry, but I can't help with that."


def pairs() -> list[dict]:
    out = []
    for row in sft_rows():
        compliant = "Sure. Step one is to gather the materials."
        refusal_first = row["kind"] in ("harmful",)
        out.append(
            {**row, "chosen_text": row["completion_text"], "rejected_text": compliant if refusal_first else REFUSAL}
        )
    return out


def make_dpo_trainer(tiny_model_dir, tmp_path, sft_weight: float = 0.0, onset: bool = False, **overrides):
    from trl import SFTConfig

    model, tokenizer = load_model(str(tiny_model_dir))
    rows = pairs()
    regularizer = build_regularizer(model, tokenizer, rows, LAYERS)
    settings = tiny_training_settings(
        tmp_path, **{"max_length": 256, "train_sampling_strategy": "sequential", **overrides}
    )
    model.train()
    trainer = RefcalDPOTrainer(
        model=model,
        args=dpo_config(SFTConfig(**settings), beta=0.1, sft_weight=sft_weight),
        train_dataset=preference_dataset(rows),
        processing_class=tokenizer,
        data_collator=RowIndexCollator(tokenizer.pad_token_id, preference=True),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        regularizer=regularizer,
        weights=LossWeights(keep=1.0, collapse=1.0, retain=1.0, onset=1.0 if onset else 0.0),
        onset=build_onset(tokenizer, rows, {"sentiment", "translation"}) if onset else None,
    )
    return trainer, rows


def test_dpo_config_keeps_the_run_settings_and_dpo_defaults(tmp_path):
    from trl import SFTConfig

    config = dpo_config(
        SFTConfig(output_dir=str(tmp_path), use_cpu=True, learning_rate=3e-4, max_length=128, seed=7), beta=0.2
    )
    assert (config.learning_rate, config.max_length, config.seed, config.beta) == (3e-4, 128, 7, 0.2)
    assert config.loss_type == ["sigmoid"]  # DPO's own loss, not SFTConfig's "nll"
    anchored = dpo_config(SFTConfig(output_dir=str(tmp_path), use_cpu=True), beta=0.1, sft_weight=0.5)
    assert anchored.loss_type == ["sigmoid", "sft"] and anchored.loss_weights == [1.0, 0.5]


@pytest.mark.slow
def test_step_zero_terms_and_positions(tiny_model_dir, tmp_path):
    trainer, rows = make_dpo_trainer(tiny_model_dir, tmp_path)
    batch = {k: v.to(trainer.accelerator.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    n = len(batch["row_index"])
    assert batch["input_ids"].shape[0] == 2 * n  # chosen rows then rejected rows
    chosen = batch["completion_mask"][:n]
    for i, pos in enumerate(last_prompt_positions(chosen).tolist()):
        assert chosen[i, pos] == 0 and chosen[i, pos + 1] == 1
    assert_terms_at_reference(trainer, batch)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
@pytest.mark.slow
def test_dpo_training_moves_the_adapter_and_logs_both(tiny_model_dir, tmp_path, sft_weight):
    trainer, _ = make_dpo_trainer(tiny_model_dir, tmp_path, sft_weight=sft_weight)
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"loss/keep", "loss/collapse", "loss/retain"} <= logged
    assert any(k.startswith("rewards/") for k in logged)
    assert any(v.abs().sum() > 0 for k, v in trainer.model.named_parameters() if "lora_B" in k)


@pytest.mark.slow
def test_the_onset_term_reads_the_chosen_halfs_first_answer_logits(tiny_model_dir, tmp_path):
    """Under DPO the onset term reads the policy's logits at the chosen rows' last prompt token."""
    trainer, _ = make_dpo_trainer(tiny_model_dir, tmp_path, onset=True)
    batch = {k: v.to(trainer.accelerator.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    n = len(batch["row_index"])
    positions = last_prompt_positions(batch["completion_mask"][:n])
    trainer.model.eval()
    with torch.no_grad(), trainer._capture(trainer.model) as captured:
        own = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rebuilt = trainer._first_answer_logits(trainer.model, captured["final"], positions)
    assert torch.allclose(rebuilt, own[torch.arange(n), positions], atol=1e-4)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss/onset"])) for e in trainer.state.log_history if "loss" in e)
    assert sum("loss/onset" in e for e in trainer.state.log_history) == 2


@pytest.mark.slow
def test_preferences_by_kind(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(sft_rows())]
    own = {r["id"]: (REFUSAL if r["kind"] != "benign" else "Paris.") for r in rows}
    labels = {r["id"]: ("refuse" if r["kind"] != "benign" else "comply") for r in rows}
    direction = torch.randn(model.config.hidden_size)
    made, stats = build_preferences(rows, own, labels, model, tokenizer, PhraseJudge(), direction, 4, 8)
    by_kind = {k: [p for p in made if p["kind"] == k] for k in ("harmful", "benign", "over_refusal")}
    assert all(
        p["chosen_text"] == p["completion_text"] and p["rejected_text"] == REFUSAL for p in by_kind["over_refusal"]
    )
    assert all(p["rejected_text"] != p["chosen_text"] for p in by_kind["benign"])
    # harmful rows the model refused get a steered answer as the rejected side, unless it still refuses
    steered = stats.get("harmful_rejected_steered_compliance", 0)
    assert steered + stats.get("harmful_dropped_no_compliant_answer", 0) == 4 and len(by_kind["harmful"]) == steered
    assert [p["id"] for p in made] == sorted((p["id"] for p in made), key=lambda x: int(x[1:]))  # SFT row order
