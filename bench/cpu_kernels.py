"""Do a CPU's kernels change refcal's answers? The same greedy answers of the embedded model, generated once
with this CPU's own kernels and once with its AVX-512 and bf16 kernels forced off (what a CPU without them
runs: ATen, oneDNN and MKL capped at AVX2), in fp32 (refcal's CPU default) and in bf16.

    python -m bench.cpu_kernels [--prompts 64]     # bench/results/cpu_kernels.json

Each setting runs in its own process, since the libraries read their caps when they load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = {
    "this CPU's": {},
    "AVX2 only (no AVX-512, no bf16)": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def answers(dtype: str, prompts: int, out: Path) -> None:
    """In a child process: the embedded model's answers to the demo recipe's eval prompts."""
    import torch

    from refcal.calibration.generation import generate
    from refcal.calibration.models import load_model
    from refcal.data_recipes.build import RecipeSizes, build_rows
    from refcal.data_recipes.tasks import load_tasks

    root = Path(__file__).resolve().parent.parent
    rows = build_rows(load_tasks(sorted((root / "configs" / "tasks").glob("*.yaml"))), RecipeSizes(), seed=0)
    texts = [r["prompt"] for r in rows if r["split"] == "eval"][:prompts]
    model, tokenizer = load_model("embedded:smollm2-135m-instruct", dtype)
    said = generate(model, tokenizer, texts, max_new_tokens=32, batch_size=64, progress=False)
    capability = torch.backends.cpu.get_cpu_capability()
    out.write_text(json.dumps({"answers": said, "aten_capability": capability}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        answers(args.child[0], args.prompts, Path(args.child[1]))
        return
    runs = {}
    for dtype in ("float32", "bfloat16"):
        for name, env in KERNELS.items():
            out = RESULTS / f".cpu_kernels_{dtype}_{len(runs)}.json"
            command = [
                sys.executable,
                "-m",
                "bench.cpu_kernels",
                "--prompts",
                str(args.prompts),
                "--child",
                dtype,
                str(out),
            ]
            subprocess.run(command, env={**os.environ, **env}, check=True)
            runs[dtype, name] = json.loads(out.read_text())
            out.unlink()
    record = {
        "command": "python -m bench.cpu_kernels",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "model": "embedded:smollm2-135m-instruct, greedy, 32 new tokens, batches of 64",
        "prompts": args.prompts,
        "kernels": {name: {"env": env, "aten_capability": runs["float32", name]["aten_capability"]} for name, env in KERNELS.items()},
    }  # fmt: skip
    own, capped = KERNELS
    for dtype in ("float32", "bfloat16"):
        a, b = runs[dtype, own]["answers"], runs[dtype, capped]["answers"]
        record[dtype] = {"identical_answers": sum(x == y for x, y in zip(a, b)), "of": len(a)}
    (RESULTS / "cpu_kernels.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
