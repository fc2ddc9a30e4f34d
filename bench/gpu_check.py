"""A few regularized LoRA training steps on a randomly initialised model of a real architecture, under one
engine, printing step time, tokens/s and peak memory. bench/gpu_check.sh runs it under every engine.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml bench/gpu_check.py --mode bf16
    python bench/gpu_check.py --mode bf16 --tiny --cpu          # the same code path, small, on the CPU (tests)

No weights or tokenizer are downloaded: the model is a Llama-3.2-1B-shaped config with random weights, and
the tokenizer is a word-level one built here from the recipe prompts, with a chat template. The speed of a
random model is the speed of a trained one of the same shape; only its outputs are meaningless.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from calibration.models import four_bit_config, load_model  # noqa: E402
from step_timer import StepTimer  # noqa: E402  (bench/, the script's own folder)
from tiny_setup import BENIGN, COMPLETIONS, HARMFUL, OVER_REFUSAL, build_regularizer, make_trainer, sft_rows  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def offline_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts`, with a ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)} | {"user", "assistant"})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, help="a label: bf16, qlora (loads 4-bit), fsdp, zero2, ...")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a 4-layer, 64-wide model instead of the 1B shape")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--jsonl", help="append the result here as one JSON line")
    args = parser.parse_args()

    rows = sft_rows(repeat=max(1, args.batch_size * (args.steps + 1) // 12))
    tokenizer = offline_tokenizer(HARMFUL + BENIGN + [p for _, p in OVER_REFUSAL] + list(COMPLETIONS.values()))
    torch.manual_seed(0)
    shape = TINY if args.tiny else LLAMA_1B
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, **shape)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        model, tokenizer = load_model(folder, quantization=four_bit_config() if args.mode == "qlora" else None)
    if not args.cpu and args.mode != "qlora":
        model.to("cuda")  # quantised models are placed on the GPU by bitsandbytes when loaded there
    layers = [config.num_hidden_layers // 2]
    regularizer = build_regularizer(model, tokenizer, rows, layers)
    timer = StepTimer()
    trainer = make_trainer(
        model, tokenizer, rows, regularizer, tempfile.mkdtemp(prefix="refcal-gpu-check-"), lora_r=16,
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, use_cpu=args.cpu,
        bf16=not args.cpu, logging_steps=1,
    )
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    warm = timer.seconds[2:] or timer.seconds  # the first steps compile kernels and warm caches
    step_seconds = sum(warm) / len(warm)
    tokens_per_step = (tokens[-1] - tokens[0]) / max(len(tokens) - 1, 1) if len(tokens) > 1 else tokens[-1]
    result = {
        "mode": args.mode,
        "model": f"Llama, random weights, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
        + (" (4-bit)" if args.mode == "qlora" else ""),
        "processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "step_seconds": round(step_seconds, 4),
        "tokens_per_second": round(tokens_per_step / step_seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "reg_terms_logged": sorted({k for e in trainer.state.log_history for k in e if k.startswith("reg_")}),
    }
    if trainer.accelerator.is_main_process:
        print(json.dumps(result), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
