"""One process with batch 4 and two DDP processes with batch 2 each train the same adapter."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PROJECT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, out: Path, tokenizer_dir: Path) -> dict:
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTEST_CURRENT_TEST", None)
    command = [
        str(ACCELERATE), "launch", "--config_file", str(PROJECT / "accelerate_configs" / f"cpu_{processes}proc.yaml"),
        "--main_process_port", env["MASTER_PORT"],
        str(PROJECT / "tests" / "distributed_train.py"), str(out), str(tokenizer_dir),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((out / "log_history.json").read_text())
    record["adapter"] = load_file(str(out / "adapter.safetensors"))
    record["rows"] = [json.loads((out / f"rows.{rank}.json").read_text()) for rank in range(processes)]
    return record


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    return {n: launch(n, base / f"p{n}", tiny_model_dir) for n in (1, 2)}


def test_both_runs_really_ran_with_their_process_counts(runs):
    assert runs[1]["processes"] == 1 and runs[2]["processes"] == 2
    assert [len(batch) for batch in runs[1]["rows"][0]] == [4, 4, 4]
    assert all(len(batch) == 2 for rank in runs[2]["rows"] for batch in rank)


def test_same_global_batches(runs):
    single = [sorted(batch) for batch in runs[1]["rows"][0]]
    rank0, rank1 = runs[2]["rows"]
    assert [sorted(a + b) for a, b in zip(rank0, rank1)] == single
    assert sorted(i for batch in single for i in batch) == list(range(12))  # one epoch, each row once


def test_loss_curves_match(runs):
    one, two = runs[1]["logs"], runs[2]["logs"]
    assert [e["step"] for e in one] == [e["step"] for e in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        for term in ("reg_keep", "reg_collapse", "reg_retain"):
            assert (term in a) == (term in b)
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=1e-3, abs=1e-6)
    # training moved the model: the curve is not flat
    assert len({round(e["loss"], 3) for e in one}) > 1


def test_adapters_match(runs):
    one, two = runs[1]["adapter"], runs[2]["adapter"]
    assert sorted(one) == sorted(two) and any("lora_A" in k for k in one)
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-4), (name, (one[name] - two[name]).abs().max())
    assert any(one[name].abs().max() > 0 for name in one if "lora_B" in name)  # the adapter trained
