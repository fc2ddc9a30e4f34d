"""One run of a study (a form of the trainer, on a seed or on a base run) in its own folder, reused while its
settings are unchanged: the one place the studies (bench.calibration_table, bench.regimes, bench.seeds,
bench.calibration_variants, and through them bench.guard_study and bench.regularizer_study) make their run
folders.

A run folder holds a marker file (bench.json, unless a study names another) with the settings it was made
with. `start` reuses a folder whose marker holds the same settings (and which holds what a finished run
leaves, where the study names it); any other folder is removed and started afresh with a new marker and
copies of the stages another run lends it (its data, organism, geometry...). The study then runs the
trainer's CLI in it (`train_cli`), whose stages skip the work they find done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings_key(configs: list[str], flags: list[str]) -> str:
    """16 hex digits of a run's settings: the text of its config files (`configs`, then each --config among
    the flags, paths relative to the repository) and the flags themselves."""
    files = [*configs, *(flags[i + 1] for i, flag in enumerate(flags) if flag == "--config")]
    text = "".join((ROOT / path).read_text() for path in files)
    return hashlib.sha256((text + json.dumps(flags)).encode()).hexdigest()[:16]


def made_with(run_dir: Path, settings: dict, marker: str = "bench.json", finished: str | None = None) -> bool:
    """Whether `run_dir` was made with these settings (its marker holds each of them) and, given `finished`
    (a path inside the folder that a finished run leaves), finished."""
    path = run_dir / marker
    if not path.is_file() or (finished is not None and not (run_dir / finished).exists()):
        return False
    recorded = json.loads(path.read_text())
    return all(recorded.get(k) == v for k, v in settings.items())


def start(
    run_dir: Path,
    settings: dict,
    notes: dict | None = None,
    marker: str = "bench.json",
    finished: str | None = None,
    lend: dict[str, Path] | None = None,
) -> bool:
    """True, touching nothing, when `run_dir` is `made_with` these settings. Otherwise False: the folder is
    removed and made again, with a marker of the settings (and `notes`, recorded but not compared) and a copy
    of each lent stage ({stage: folder of another run}) that exists."""
    if made_with(run_dir, settings, marker, finished):
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / marker).write_text(json.dumps({**settings, **(notes or {})}))
    for stage, source in (lend or {}).items():
        if source.is_dir():
            shutil.copytree(source, run_dir / stage)
    return False


def train_cli(arguments: list[str], env: dict | None = None) -> None:
    """`python -m refcal.train.cli ARGUMENTS` from the repository root; a failed run raises."""
    run_to_the_end([sys.executable, "-m", "refcal.train.cli", *arguments], env)


def run_to_the_end(command: list[str], env: dict | None = None) -> None:
    """Run `command` from the repository root; a failed run raises. A SIGTERM to the study stops the run as
    well (SIGTERM's default ends this process alone and leaves the run going; subprocess.run kills its child
    on an exception); the run resumes from its checkpoints when the study starts again."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        subprocess.run(command, cwd=ROOT, check=True, env=env)
    finally:
        signal.signal(signal.SIGTERM, previous)
