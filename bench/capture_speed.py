"""Activation capture against a plain no-grad forward pass, side by side on the same batches.

Capture hooks every decoder layer and keeps the last prompt token; the plain pass runs the same model on
the same left-padded batches and keeps nothing. Rounds alternate (plain, capture, plain, capture, ...)
so that machine noise hits both alike; the result is the ratio of their tokens per second.

    python -m bench.capture_speed          # embedded SmolLM2-135M-Instruct, 128 recipe prompts, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from refcal.calibration.activations import capture_last_token, chat_prompts, encode_left_padded
from refcal.calibration.models import load_model
from refcal.data_recipes.build import RecipeSizes, build_rows
from refcal.data_recipes.tasks import load_tasks

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def plain_forward(model, tokenizer, prompts: list[str], batch_size: int) -> None:
    texts = chat_prompts(tokenizer, prompts)
    for start in range(0, len(texts), batch_size):
        model(**encode_left_padded(tokenizer, texts[start : start + batch_size], "cpu"), use_cache=False)


def count_tokens(tokenizer, prompts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in chat_prompts(tokenizer, prompts))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/capture_speed.json")
    args = parser.parse_args()

    rows = build_rows(load_tasks(sorted((ROOT / "configs" / "tasks").glob("*.yaml"))), RecipeSizes(), seed=0)
    prompts = [r["prompt"] for r in rows][: args.prompts]
    model, tokenizer = load_model(args.model, "float32")
    model.eval()
    tokens = count_tokens(tokenizer, prompts)
    plain_forward(model, tokenizer, prompts[: args.batch_size], args.batch_size)  # warm-up
    seconds = {"plain": [], "capture": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        plain_forward(model, tokenizer, prompts, args.batch_size)
        seconds["plain"].append(time.perf_counter() - started)
        started = time.perf_counter()
        activations = capture_last_token(model, tokenizer, prompts, batch_size=args.batch_size, progress=False)
        seconds["capture"].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in seconds.items()}  # the least disturbed round of each
    result = {
        "model": args.model,
        "prompts": len(prompts),
        "tokens": tokens,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "seconds": seconds,
        "tokens_per_second": {k: round(tokens / v, 1) for k, v in best.items()},
        "capture_over_plain_throughput": round(best["plain"] / best["capture"], 3),
        "stored_activation_mib": round(activations.numel() * activations.element_size() / 2**20, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    (ROOT / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
