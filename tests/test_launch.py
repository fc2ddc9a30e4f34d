"""`accelerate launch train.py` with two CPU processes is one distributed run, not two pipelines.

Every stage starts once, training runs under DDP with the global batch (per device x processes x
accumulation steps) and the step count that follows, the logged losses are the processes' reduced ones,
and the adapter equals a one-process run's on the same global batch. Checked for `refcal run` (SFT with the
geometry regularizer, accumulation and an organism trained under DDP), `retrain` (the recommended
target-free form with the onset term, with accumulation) and DPO. The config sets no device: refcal picks
the CPU itself.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e  # every test starts `accelerate launch` over two processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGE_LINE = "→ {}\n"
TWO_PROCESSES = "training on cpu, 2 processes (MULTI_CPU, gloo)"
TARGET_FREE = [
    "--objective",
    "target_free",
    "--onset_weight",
    "1",
    "--keep_weight",
    "0",
    "--collapse_weight",
    "0",
    "--retain_weight",
    "0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], env: dict) -> str:
    """train.py under `accelerate launch` with accelerate_configs/cpu_2proc.yaml; returns what it printed."""
    command = [
        str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
        "--main_process_port", str(free_port()), str(ROOT / "train.py"), *argv,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr + done.stdout


def one_process(argv: list[str], env: dict) -> str:
    done = subprocess.run([str(BIN / "refcal"), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr + done.stdout


def assert_one_run(log: str, stages: list[str], skipped: list[str] = (), training: bool = True) -> None:
    for stage in stages:
        assert log.count(STAGE_LINE.format(stage)) == 1, (stage, log[-3000:])
    for stage in skipped:
        assert STAGE_LINE.format(stage) not in log
    if training:
        assert log.count(TWO_PROCESSES) == 1 and log.count("✓ sft_data") == 1


def engine(run_dir: Path) -> dict:
    return json.loads((run_dir / "train" / "train.json").read_text())["engine"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


def assert_same_training(one: Path, two: Path, steps: int) -> None:
    assert [step for step, _ in losses(two)] == [step for step, _ in losses(one)] == list(range(1, steps + 1))
    for (_, a), (_, b) in zip(losses(one), losses(two)):
        assert b == pytest.approx(a, rel=1e-4)  # the main process logs every process's loss, not its own
    assert_same_weights(
        one / "train" / "adapter" / "adapter_model.safetensors", two / "train" / "adapter" / "adapter_model.safetensors"
    )
    assert (one / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (two / "export" / "adapter" / "adapter_model.safetensors").is_file()


def assert_same_weights(first: Path, second: Path, atol: float = 1e-4) -> None:
    """Equal to a tenth of one Adam step (lr 1e-3): summation order differs between one process and an
    all-reduce, and Adam turns gradients near its epsilon into updates of up to a step. A term counted
    twice or halved moves many weights by whole steps."""
    a, b = load_file(first), load_file(second)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), (name, (a[name] - b[name]).abs().max())


def copy_stages(source: Path, target: Path, stages: tuple[str, ...]) -> None:
    for stage in stages:
        shutil.copytree(source / stage, target / stage)


def test_run_is_one_ddp_run_with_the_global_batch(e2e, tmp_path):
    """The e2e fixture is the one-process run: 8 rows per step. Two processes of 2 rows with 2 accumulation
    steps train the same global batch; the organism is trained again, under DDP, in a cache of its own."""
    config, reference, env = e2e
    run_dir = tmp_path / "run"
    log = launch(
        ["--config", str(config), "--run_dir", str(run_dir), "--output_dir", str(run_dir / "train"),
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"],
        {**env, "REFCAL_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert_one_run(log, ["data", "organism", "geometry", "train", "eval", "export"])
    assert "global batch 8 = 2 per device x 2 x 2 accumulation steps" in log
    (tmp_path / "launch.log").write_text(log)
    check = [sys.executable, "-m", "bench.engine_check", str(run_dir), "--mode", "cpu_ddp",
             "--log", str(tmp_path / "launch.log"), "--processes", "2"]  # fmt: skip
    line = json.loads(subprocess.run(check, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert line["ok"] and line["train_stage_starts"] == 1 and line["expected_steps"] == 3  # bench/gpu_check.sh's check

    rows = json.loads((run_dir / "sft_data" / "targets.json").read_text())["rows"]
    record, single = engine(run_dir), engine(reference)
    assert (record["processes"], record["distributed_type"], record["global_batch"]) == (2, "MULTI_CPU", 8)
    assert (single["processes"], single["global_batch"]) == (1, 8)
    assert rows % 8 == 0, f"the fixture's {rows} rows must fill whole global batches for the runs to agree"
    assert record["steps"] == single["steps"] == math.ceil(rows / 8) == 3  # one epoch of the global batch
    assert_same_training(reference, run_dir, steps=3)

    organisms = [json.loads((run / "organism" / "organism.json").read_text()) for run in (reference, run_dir)]
    assert organisms[0]["key"] == organisms[1]["key"]  # keyed by the global batch, not by how it is split
    assert organisms[0]["path"] != organisms[1]["path"]  # trained twice, once per process count, in two caches
    assert_same_weights(*(Path(record["path"]) / "model.safetensors" for record in organisms))


def test_retrain_is_one_ddp_run(e2e, tmp_path):
    """`train.py retrain` continues the e2e adapter on a new cluster, target-free with the onset term, over two
    processes with two accumulation steps each: the onset term's per-row mean holds across both."""
    config, parent, env = e2e
    common = ["--config", str(config), "--adapter", str(parent / "export" / "adapter"),
              "--tasks", str(ROOT / "configs" / "tasks" / "grammar.yaml"), "--max_steps", "2", *TARGET_FREE]  # fmt: skip
    one_process(["retrain", *common, "--run_dir", str(tmp_path / "one")], env)
    log = launch(["retrain", *common, "--run_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2",
                  "--gradient_accumulation_steps", "2"], env)  # fmt: skip
    assert_one_run(log, ["data", "geometry", "train", "eval", "export"], skipped=["organism"])
    assert log.count("reused from the parent run") == 1  # the organism the parent adapter was calibrated on

    assert (engine(tmp_path / "two")["global_batch"], engine(tmp_path / "one")["global_batch"]) == (8, 8)
    assert "global batch 8 = 2 per device x 2 x 2 accumulation steps" in log
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=2)
    history = json.loads((tmp_path / "two" / "train" / "log_history.json").read_text())
    assert all("loss/onset" in e for e in history if "loss" in e)
    card = json.loads((tmp_path / "two" / "export" / "adapter" / "calibration_card.json").read_text())
    assert "grammar" in card["calibrate_tasks"]


def test_dpo_is_one_ddp_run(e2e, tmp_path):
    """DPO with the geometry regularizer on the e2e run's data, organism and geometry."""
    config, reference, env = e2e
    for name in ("one", "two"):
        copy_stages(reference, tmp_path / name, ("data", "organism", "geometry"))
    common = ["--config", str(config), "--objective", "dpo", "--max_steps", "2"]
    one_process(["run", *common, "--run_dir", str(tmp_path / "one"), "--output_dir", str(tmp_path / "one" / "train"),
                 "--per_device_train_batch_size", "4"], env)  # fmt: skip
    log = launch([*common, "--run_dir", str(tmp_path / "two"), "--output_dir", str(tmp_path / "two" / "train"),
                  "--per_device_train_batch_size", "2"], env)  # fmt: skip
    assert_one_run(log, ["train", "eval", "export"], skipped=["data", "organism", "geometry"])

    assert (engine(tmp_path / "two")["global_batch"], engine(tmp_path / "one")["global_batch"]) == (4, 4)
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=2)
    history = json.loads((tmp_path / "two" / "train" / "log_history.json").read_text())
    assert all("rewards/chosen" in e and "loss/keep" in e for e in history if "loss" in e)


def test_inference_is_spread_over_the_processes_with_one_processs_answers(e2e, tmp_path):
    """Geometry (answers, activations, layer choice) and eval (before, after, the base model's answers) under
    two processes: each process generates about half of every set of prompts, and the answers, activations,
    layer scores and rates equal a one-process run's on the same data, organism and adapter."""
    config, reference, env = e2e
    runs = {name: tmp_path / name for name in ("one", "two")}
    for run_dir in runs.values():  # the reference's adapter, so that only geometry and eval run again
        copy_stages(reference, run_dir, ("data", "organism", "sft_data", "train"))
    common = ["run", "--config", str(config), "--generation_batch_size", "2"]  # several batches to deal out
    # each run its own answer cache, so that the second does not read the first one's answers
    envs = {name: {**env, "REFCAL_CACHE": str(tmp_path / f"cache-{name}")} for name in runs}
    one_process([*common, "--run_dir", str(runs["one"])], envs["one"])
    log = launch([*common, "--run_dir", str(runs["two"])], envs["two"])
    assert_one_run(log, ["geometry", "eval"], skipped=["data", "organism", "train"], training=False)

    one, two = runs["one"], runs["two"]
    assert (one / "geometry" / "responses.jsonl").read_text() == (two / "geometry" / "responses.jsonl").read_text()
    activations = [load_file(run / "geometry" / "activations.safetensors")["last_token"] for run in (one, two)]
    assert torch.equal(*activations)
    scores = [json.loads((run / "geometry" / "geometry.json").read_text())["layer_scores"] for run in (one, two)]
    assert len(scores[0]) == len(scores[1]) == 2
    for first, second in zip(*scores):
        assert first == pytest.approx(second, rel=1e-5, abs=1e-6)
    assert (one / "eval" / "generations.jsonl").read_text() == (two / "eval" / "generations.jsonl").read_text()
    results = [json.loads((run / "eval" / "results.json").read_text()) for run in (one, two)]
    assert [r.pop("computed_on")["processes"] for r in results] == [1, 2]
    assert results[0] == results[1]

    profile = json.loads((two / "profile.json").read_text())
    spread = {
        (stage, name): entry["prompts_per_process"]
        for stage in ("geometry", "eval")
        for name, entry in profile[stage]["sections"].items()
        if name.startswith("generation") or name == "layer choice"
    }
    assert set(spread) == {
        ("geometry", "generation: own responses"),
        ("geometry", "layer choice"),
        ("eval", "generation: eval before"),
        ("eval", "generation: eval after"),
        ("eval", "generation: eval base model"),
    }
    for counts in spread.values():  # every other batch of 2: the halves differ by one batch at most
        assert len(counts) == 2 and abs(counts[0] - counts[1]) <= 2 and min(counts) > 0, spread
