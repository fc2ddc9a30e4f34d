"""Memory of activation capture as the number of prompts grows: in memory against streamed to disk.

Each (mode, prompt count) runs in a fresh process: load the model, capture one warm-up batch, then sample
the process's resident memory every 5 ms while capturing every layer at the last prompt token for all the
prompts. The figure is the peak growth over the resident memory just before the capture. In memory, it
should grow by about the stored activations; streamed to a safetensors file, it should not grow at all.

    python -m bench.capture_memory          # embedded SmolLM2-135M-Instruct, 256 and 2048 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from refcal.calibration.activations import capture_last_token, stream_last_token
from refcal.calibration.models import load_model
from refcal.data_recipes.build import RecipeSizes, build_rows
from refcal.data_recipes.tasks import load_tasks

ROOT = Path(__file__).resolve().parent.parent

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_MIB


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = rss_mib()
        self.running = True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.005)


def measure(model_name: str, mode: str, count: int, batch_size: int) -> dict:
    rows = build_rows(load_tasks(sorted((ROOT / "configs" / "tasks").glob("*.yaml"))), RecipeSizes(), seed=0)
    # the same first rows cycled, so every count runs the same batches and only the stored result differs
    prompts = [rows[i % min(len(rows), 256)]["prompt"] for i in range(count)]
    model, tokenizer = load_model(model_name, "float32")
    model.eval()
    capture_last_token(model, tokenizer, prompts[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    with tempfile.TemporaryDirectory() as folder:
        before = rss_mib()
        sampler = PeakSampler()
        sampler.start()
        if mode == "in_memory":
            activations = capture_last_token(model, tokenizer, prompts, batch_size=batch_size, progress=False)
            stored = activations.numel() * 4
        else:
            path = stream_last_token(
                model, tokenizer, prompts, Path(folder) / "a.safetensors", batch_size=batch_size, progress=False
            )
            stored = path.stat().st_size
        sampler.running = False
        sampler.join()
    return {
        "mode": mode,
        "prompts": count,
        "stored_mib": round(stored / 2**20, 1),
        "peak_growth_mib": round(sampler.peak - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--counts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", default="bench/results/capture_memory.json")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "COUNT"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one[0], int(args.one[1]), args.batch_size)))
        return

    runs = []
    for count in args.counts:
        for mode in ("in_memory", "streamed"):
            command = [
                sys.executable,
                "-m",
                "bench.capture_memory",
                "--model",
                args.model,
                "--batch_size",
                str(args.batch_size),
                "--one",
                mode,
                str(count),
            ]
            output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    small, large = min(args.counts), max(args.counts)
    pick = {(r["mode"], r["prompts"]): r for r in runs}
    growth = {
        mode: round(pick[(mode, large)]["peak_growth_mib"] - pick[(mode, small)]["peak_growth_mib"], 1)
        for mode in ("in_memory", "streamed")
    }
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "runs": runs,
        f"extra_stored_mib_{small}_to_{large}": round(
            pick[("in_memory", large)]["stored_mib"] - pick[("in_memory", small)]["stored_mib"], 1
        ),
        f"peak_growth_increase_mib_{small}_to_{large}": growth,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    (ROOT / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
