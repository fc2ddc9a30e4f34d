"""SIGKILL at a random point inside every stage of `refcal run`, then resume, again and again: no stage folder
is ever half-written, a completed stage is never redone or lost, and the run ends with the artifacts of a
run that was never killed."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_kill import kill_when

from refcal.calibration.geometry.directions import Geometry
from refcal.train.run import STAGES

pytestmark = pytest.mark.e2e  # kills `refcal run` subprocesses in every stage, then resumes them

ROOT = Path(__file__).resolve().parent.parent
REFCAL = Path(sys.executable).with_name("refcal")
STAGE_FOLDERS = ("data", "organism", "geometry", "sft_data", "train", "eval", "export")
SEED = 20261201  # the kill times are random but repeatable; change it to try other points


def finished(run_dir: Path, name: str) -> Path | None:
    """The path that says a stage is done: its folder, or for train (whose folder holds the Trainer's
    checkpoints while it runs) the train.json it writes last."""
    path = run_dir / name / "train.json" if name == "train" else run_dir / name
    return path if path.exists() else None


def assert_whole(run_dir: Path) -> None:
    """Every stage folder that exists loads completely; no staging folder is left under a final name."""
    from datasets import load_from_disk

    if (run_dir / "data").exists():
        load_from_disk(str(run_dir / "data" / "recipe"))
        json.loads((run_dir / "data" / "manifest.json").read_text())
    if (run_dir / "organism").exists():
        json.loads((run_dir / "organism" / "organism.json").read_text())
    if (run_dir / "geometry").exists():
        Geometry.load(run_dir / "geometry")
        load_file(run_dir / "geometry" / "activations.safetensors")
    if finished(run_dir, "train"):
        load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
        json.loads((run_dir / "train" / "log_history.json").read_text())
    if (run_dir / "eval").exists():
        json.loads((run_dir / "eval" / "results.json").read_text())
    if (run_dir / "export").exists():
        load_file(run_dir / "export" / "adapter" / "adapter_model.safetensors")
        json.loads((run_dir / "export" / "adapter" / "calibration_card.json").read_text())


def stamps(run_dir: Path) -> dict[str, int]:
    return {name: finished(run_dir, name).stat().st_mtime_ns for name in STAGE_FOLDERS if finished(run_dir, name)}


class Console:
    """The process's console output, read as it comes (the pipeline prints "→ stage" as each one starts)."""

    def __init__(self, process: subprocess.Popen):
        self.text = ""
        self.reader = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self.reader.start()

    def _read(self, stream) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            self.text += chunk.decode(errors="replace")


def test_sigkill_in_every_stage_then_resume_ends_as_an_unkilled_run(e2e, tmp_path):
    config, reference, env = e2e
    run_dir = tmp_path / "run"
    env = {
        **env,
        "REFCAL_CACHE": str(tmp_path / "cache"),
    }  # its own organism cache: the organism is trained, and killed, too
    command = [
        str(REFCAL),
        "run",
        "--config",
        str(config),
        "--run_dir",
        str(run_dir),
        "--output_dir",
        str(run_dir / "train"),
    ]
    seconds = json.loads((reference / "timings.json").read_text())  # how long each stage took unkilled
    rng = random.Random(SEED)
    kills = []
    # Each stage in turn is killed at a random moment after its "→ stage" line, within half its usual
    # length; the next attempt redoes it and goes on to the next. A kill that overshoots into the next
    # stage (a stage ran faster than unkilled) makes that one finished already: it is passed over.
    for stage in STAGES:
        if finished(run_dir, stage):
            continue
        kept = stamps(run_dir)
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        console, delay, seen = Console(process), rng.uniform(0.0, 0.5 * max(seconds[stage], 0.05)), []

        def ready(stage=stage, console=console, delay=delay, seen=seen):
            if stage == "train":  # right after the first checkpoint: where a resumed run once skipped training
                return (run_dir / "train" / "checkpoint-1" / "trainer_state.json").exists()
            if not seen and f"→ {stage}" in console.text:
                seen.append(time.time())
            return bool(seen) and time.time() - seen[0] >= delay

        killed = kill_when(process, ready, timeout=300)
        console.reader.join(timeout=10)
        assert killed or process.returncode == 0, console.text[-3000:]
        landed = console.text.rsplit("→ ", 1)[-1].split()[0] if "→ " in console.text else "startup"
        kills.append((stage, landed if killed else "not killed", round(delay, 2)))
        assert_whole(run_dir)
        after = stamps(run_dir)
        assert {k: after.get(k) for k in kept} == kept, f"a completed stage was redone or lost after kill {kills[-1]}"
    print("kills (stage aimed at, stage killed in, delay s):", kills)
    landed_in = {landed for _, landed, _ in kills} - {"not killed", "startup"}
    assert len(landed_in) >= 4 and "train" in landed_in, kills  # killed inside most stages, train included
    final = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list(run_dir.glob(".*-*")), "staging folders left behind"

    expected = json.loads((reference / "eval" / "results.json").read_text())
    resumed = json.loads((run_dir / "eval" / "results.json").read_text())
    assert resumed["before"] == expected["before"] and resumed["after"] == expected["after"], kills
    assert Geometry.load(run_dir / "geometry").layer == Geometry.load(reference / "geometry").layer
    a = load_file(reference / "export" / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "export" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n} after kills {kills}: {m}"
        )
