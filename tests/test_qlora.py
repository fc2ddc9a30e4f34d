"""QLoRA: the base loads in 4 bits through bitsandbytes (on the CPU too) and the regularized trainer
updates only the LoRA adapter on it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from fixtures import build_regularizer, make_trainer, sft_rows

from refcal.calibration.models import four_bit_config, load_model
from refcal.train.run import Run


def test_four_bit_config_is_qlora_recipe():
    config = four_bit_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.slow
def test_regularized_training_on_a_4bit_base(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir), quantization=four_bit_config())
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    probe = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        frozen = model.model.layers[0].mlp.up_proj(probe)
    rows = sft_rows()
    regularizer = build_regularizer(model, tokenizer, rows, [1, 3])
    trainer = make_trainer(model, tokenizer, rows, regularizer, tmp_path, bf16=False)
    lora_before = {k: v.detach().float().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"loss/keep", "loss/collapse", "loss/retain"} <= logged
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    moved = [
        k
        for k, v in trainer.model.named_parameters()
        if "lora_B" in k and not torch.equal(v.detach().float(), lora_before[k])
    ]
    assert moved  # lora_B starts at zero: any change is the trainer's
    with torch.no_grad():  # the 4-bit base layer computes what it did before training
        after = trainer.model.get_base_model().model.layers[0].mlp.up_proj.base_layer(probe)
    assert torch.equal(after, frozen)


def fake_run(**model_fields) -> Run:
    run = Run.__new__(Run)
    run.model_args = SimpleNamespace(
        **{"load_in_4bit": False, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4", **model_fields}
    )
    return run


def test_run_describes_and_guards_its_weights():
    assert fake_run(load_in_4bit=True).weights_description(qlora=True).startswith("4-bit nf4")
    assert fake_run(load_in_4bit=True).weights_description(qlora=False) == "unquantised"
    assert fake_run().weights_description(qlora=True) == "unquantised"
    with pytest.raises(ValueError, match="not 8-bit"):
        fake_run(load_in_8bit=True).load()
