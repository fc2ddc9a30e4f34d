"""The cost of the geometry regularizer: TRL's plain SFTTrainer against refcal's RefcalSFTTrainer, with the
same LoRA, on the same batches in the same order.

Each run is a fresh process (so peak memory is its own): load the model, build the trainer, train a few
steps; it reports the mean step time after the first step and peak memory (CUDA: the most allocated during
training; CPU: the process's peak resident memory, model loading included, since resident-memory growth
depends on what earlier work left in the heap). Runs alternate (plain, refcal, plain, ...) so
that machine noise hits both alike; the results are ratios of the medians.

    python -m bench.regularizer_cost          # embedded SmolLM2-135M-Instruct, 5 rounds of 6 steps, batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.step_timer import StepTimer

ROOT = Path(__file__).resolve().parent.parent


def one_run(model_name: str, refcal: bool, steps: int, batch_size: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))  # the suite's small regularized SFT setup
    from fixtures import COMPLETIONS, build_regularizer
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from refcal.calibration.models import load_model
    from refcal.data_recipes.build import RecipeSizes, build_rows
    from refcal.data_recipes.tasks import load_tasks
    from refcal.train.losses.table import LossWeights
    from refcal.train.losses.trainer import RefcalSFTTrainer, RowIndexCollator
    from refcal.train.stages.sft_data import sft_dataset

    recipe = build_rows(load_tasks(sorted((ROOT / "configs" / "tasks").glob("*.yaml"))), RecipeSizes(), seed=0)
    rows = [
        {
            "prompt": r["prompt"],
            "kind": r["kind"],
            "task": r["task"],
            "completion_text": COMPLETIONS.get(r["kind"], COMPLETIONS["benign"]),
        }
        for r in recipe
        if r["split"] == "train"
    ]
    random.Random(0).shuffle(rows)  # every kind in the first batches, the same order for both trainers
    rows = rows[: steps * batch_size]
    model, tokenizer = load_model(model_name, "float32")
    layer = len(model.model.layers) * 2 // 3
    regularizer = build_regularizer(model, tokenizer, rows, [layer], rank=4) if refcal else None
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="refcal-cost-"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        max_length=256,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        model=model, args=config, train_dataset=sft_dataset(rows), processing_class=tokenizer, peft_config=lora
    )
    if refcal:
        trainer = RefcalSFTTrainer(
            **common,
            data_collator=RowIndexCollator(tokenizer.pad_token_id),
            regularizer=regularizer,
            weights=LossWeights(keep=1.0, collapse=1.0, retain=1.0),
        )
    else:
        trainer = SFTTrainer(**common)
    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "trainer": "refcal" if refcal else "plain",
        "step_seconds": statistics.mean(timer.seconds[1:]),
        "peak_memory_mib": round(peak, 1),
        "terms_logged": sorted({k for e in trainer.state.log_history for k in e if k.startswith("loss/")}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", default="bench/results/regularizer_cost.json")
    parser.add_argument("--one", choices=["plain", "refcal"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.model, args.one == "refcal", args.steps, args.batch_size)))
        return

    runs = []
    for _ in range(args.rounds):
        for which in ("plain", "refcal"):
            command = [sys.executable, "-m", "bench.regularizer_cost", "--model", args.model, "--steps", str(args.steps),
                       "--batch_size", str(args.batch_size), "--one", which]  # fmt: skip
            output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    median = {
        which: {
            key: statistics.median(r[key] for r in runs if r["trainer"] == which)
            for key in ("step_seconds", "peak_memory_mib")
        }
        for which in ("plain", "refcal")
    }
    result = {
        "model": args.model,
        "steps_per_run": args.steps,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "runs": runs,
        "median": median,
        "refcal_over_plain_step_time": round(median["refcal"]["step_seconds"] / median["plain"]["step_seconds"], 3),
        "refcal_over_plain_peak_memory": round(
            median["refcal"]["peak_memory_mib"] / median["plain"]["peak_memory_mib"], 3
        ),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
    }
    (ROOT / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
