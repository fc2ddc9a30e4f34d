"""A run folder is locked while a run works in it, and two builds of one organism leave one whole cache entry.

The lock's holders are other processes (the lock is an flock, which the kernel drops when its holder dies),
so each test holds it in a child process.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import pytest
import yaml

from refcal.calibration.infra.locks import InUseError, exclusive_lock, read_holder, waiting_lock
from refcal.train import cli

HOLD = """
import sys, time
from refcal.calibration.infra.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "test lock"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextmanager
def held_by_child(path: Path, seconds: float = 120):
    """A child process that holds the lock at `path` for `seconds`; killed on exit."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_held_lock_is_refused_at_once_naming_its_holder(tmp_path):
    lock = tmp_path / ".lock"
    with held_by_child(lock) as child:
        with pytest.raises(InUseError) as error:
            with exclusive_lock(lock, f"run folder {tmp_path}", "use another run_dir"):
                pytest.fail("took a lock another process holds")
    message = str(error.value)
    assert message.startswith(f"run folder {tmp_path} is in use by process {child.pid} (-c ") and message.endswith(
        "; use another run_dir"
    )
    assert " since 20" in message
    with exclusive_lock(lock, "x"):  # free again once its holder is gone
        assert read_holder(lock)["pid"] == os.getpid()
    assert not lock.exists()  # a clean release leaves no lock file


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    lock = tmp_path / ".lock"
    with held_by_child(lock) as child:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert read_holder(lock)["pid"] == child.pid  # its record stays; its flock went with it
    with exclusive_lock(lock, "x"):
        assert read_holder(lock)["pid"] == os.getpid()
    assert f"from process {child.pid}, which ended without releasing it" in capsys.readouterr().err


def test_a_waiting_lock_waits_for_its_holder(tmp_path, capsys):
    lock = tmp_path / "k.lock"
    with held_by_child(lock, seconds=2) as child:
        started = time.monotonic()
        with waiting_lock(lock, "another build"):
            assert time.monotonic() - started > 1.5  # acquired only once the holder let go
    assert f"waiting for another build: process {child.pid}" in capsys.readouterr().err


def test_a_second_run_on_a_locked_run_folder_stops_with_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "manifest.json").write_text("{}")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tmp_path / "model"), "run_dir": str(run_dir), "output_dir": str(run_dir / "train"),
        "report_to": "none", "use_cpu": True,
    }))  # fmt: skip
    with held_by_child(run_dir / ".lock") as child:
        with pytest.raises(SystemExit) as done:
            cli.main(["run", "--config", str(config), "--force"])  # --force would delete every stage folder
    assert done.value.code == 2
    err = capsys.readouterr().err
    line = f"refcal: error: run folder {run_dir} is in use by process {child.pid} ("
    assert line in err and "wait for it or use another run_dir" in err and "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "data"]  # the holder's lock, the stage untouched
    assert (run_dir / "data" / "manifest.json").read_text() == "{}"


# ---- two builds of one organism -------------------------------------------------------------------


def build_in_child(model_dir: str, cache: str, work: str, barrier, results) -> None:
    """One organism build, started with the other at the barrier; sends back its path and its stderr."""
    os.environ["REFCAL_CACHE"] = cache
    from accelerate import PartialState
    from fixtures import BENIGN, HARMFUL, OVER_REFUSAL
    from trl import SFTConfig

    from refcal.train.stages.organism import build_organism

    rows = [{"id": f"h{i}", "prompt": p, "kind": "harmful", "task": "none"} for i, p in enumerate(HARMFUL)]
    rows += [{"id": f"b{i}", "prompt": p, "kind": "benign", "task": "none"} for i, p in enumerate(BENIGN)]
    rows += [{"id": f"o{i}", "prompt": p, "kind": "over_refusal", "task": t} for i, (t, p) in enumerate(OVER_REFUSAL)]
    settings = {"lora_r": 2, "answer_max_new_tokens": 2, "seed": 0}
    args = SFTConfig(
        output_dir=work, max_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    barrier.wait()
    err = io.StringIO()
    with redirect_stderr(err):
        path, _ = build_organism(model_dir, rows, ["sentiment"], settings, args, "rows", "float32", 4, PartialState())
    results.put((work, str(path), err.getvalue()))


@pytest.mark.slow
def test_two_builds_of_one_organism_leave_one_whole_entry_and_the_second_reuses_it(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    works = [str(tmp_path / f"work{i}") for i in range(2)]
    children = [
        context.Process(target=build_in_child, args=(str(tiny_model_dir), str(cache), w, barrier, results))
        for w in works
    ]
    for child in children:
        child.start()
    try:
        done = [results.get(timeout=300) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            child.kill()
    assert all(child.exitcode == 0 for child in children)
    (_, path, _), (_, other, _) = done
    assert path == other
    waited = [work for work, _, err in done if "waiting for another build of the same organism" in err]
    assert len(waited) == 1, "the builds did not overlap, or both took the lock"
    trained = [work for work in works if (Path(work) / "base_answers.json").exists()]
    assert len(trained) == 1 and trained != waited, "the second build trained instead of reusing the entry"
    entry = Path(path)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no staging folder, no lock file left
    assert {"config.json", "model.safetensors", "organism.json"} <= {p.name for p in entry.iterdir()}
