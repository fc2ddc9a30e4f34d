"""SIGKILL at any point loses no completed work: a killed stage leaves its folder whole or absent, and a
killed training run resumes from its newest complete checkpoint to the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from refcal.train.resume import last_checkpoint

ROOT = Path(__file__).resolve().parent.parent
REFCAL = Path(sys.executable).with_name("refcal")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL the process as soon as `ready()` holds; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)  # the data stage's staging folder can live for only tens of milliseconds
    process.wait()
    return False


@pytest.mark.e2e  # kills a subprocess
def test_killed_training_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    script = [sys.executable, "tests/kill_train.py"]
    # the uninterrupted run goes on beside the killed ones: one thread each, and no files in common
    whole = start([*script, str(tmp_path / "whole"), str(tiny_model_dir)])
    run = tmp_path / "killed"
    # a checkpoint counts once its trainer_state.json is whole: the Trainer writes it in place, not by rename
    checkpoint = lambda step: (last_checkpoint(str(run / "checkpoints")) or "").endswith(f"checkpoint-{step}")  # noqa: E731
    for step in (2, 4):  # killed right after each of two checkpoints
        assert kill_when(start([*script, str(run), str(tiny_model_dir)]), lambda s=step: checkpoint(s))
        assert last_checkpoint(str(run / "checkpoints")).endswith(f"checkpoint-{step}")
        assert not (run / "adapter.safetensors").exists()
    final = start([*script, str(run), str(tiny_model_dir)])
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-3000:]
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()[-3000:]

    expected, resumed = load_file(tmp_path / "whole" / "adapter.safetensors"), load_file(run / "adapter.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-6)


def test_partial_checkpoints_are_passed_over(tmp_path):
    for step, state in ((2, "{}"), (4, None), (6, '{"global_step": 6')):  # complete, no state, truncated
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert last_checkpoint(str(tmp_path / "missing")) is None


@pytest.mark.e2e  # kills a subprocess
def test_killed_data_stage_leaves_it_whole_or_absent(tiny_model_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\nrun_dir: {tmp_path / 'run'}\noutput_dir: {tmp_path / 'run' / 'train'}\nreport_to: none\nbf16: false\n"
    )
    command = [str(REFCAL), "data", "--config", str(config)]
    data = tmp_path / "run" / "data"
    staging = lambda: any((tmp_path / "run").glob(".data-*"))  # noqa: E731
    assert kill_when(start(command), staging)  # killed while writing the stage
    assert not data.exists()
    final = start(command)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-3000:]
    assert not staging()  # the killed run's staging folder was cleared
    manifest = json.loads((data / "manifest.json").read_text())
    recipe = load_from_disk(str(data / "recipe"))
    assert {split: len(recipe[split]) for split in recipe} == {s: v["rows"] for s, v in manifest["splits"].items()}


SLOW_STAGE = """
import sys, time
from pathlib import Path
from refcal.calibration.infra.artifacts import atomic_directory
with atomic_directory(Path(sys.argv[1])) as staging:
    for i in range(100):
        (staging / f"part-{i}").write_text("x" * 1000)
        time.sleep(0.05)
"""


@pytest.mark.e2e  # kills a subprocess
def test_killed_stage_write_keeps_the_previous_folder(tmp_path):
    """Geometry, eval and export write their folders the same way: killed mid-write, the previous folder
    (here a finished earlier version) stays whole and nothing half-written takes its name."""
    stage = tmp_path / "geometry"
    stage.mkdir()
    (stage / "geometry.json").write_text("{}")
    writer = start([sys.executable, "-c", SLOW_STAGE, str(stage)])
    assert kill_when(writer, lambda: len(list(tmp_path.glob(".geometry-*/part-*"))) >= 5)
    assert sorted(p.name for p in stage.iterdir()) == ["geometry.json"]
