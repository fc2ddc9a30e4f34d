"""Session fixtures: the real chat tokenizer and a tiny, randomly initialised Llama that uses it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the hub (read when datasets is imported)
# `make test` runs the suite in two pytest-xdist workers, one core each: most tests are single-threaded at
# heart (imports, subprocesses with one thread, tiny matrices), so two workers fill both cores. Each worker
# builds the session fixtures it needs in its own temporary folder.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(max(1, 2 // WORKERS)))))

EMBEDDED = "embedded:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tokenizer():
    from refcal.calibration.models import load_tokenizer

    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    from fixtures import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(tokenizer, directory, seed=0)
    return directory


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def e2e(tokenizer, tmp_path_factory):
    """The whole pipeline (`refcal run`, every stage) once, on a tiny model that refuses like an organism:
    (config path, run folder, environment). Its organism cache is its own, never ~/.cache/refcal."""
    import subprocess

    from fixtures import E2E_CONFIG, isolated_env, save_refusing_model, write_user_task

    base = tmp_path_factory.mktemp("e2e")
    config = base / "config.yaml"
    user_task = write_user_task(base / "my_tasks")
    config.write_text(E2E_CONFIG.format(model=base / "model", run_dir=base / "run", root=ROOT, user_task=user_task))
    save_refusing_model(tokenizer, base / "model", config)
    env = isolated_env(base / "cache")
    # `refcal run` under the device sentinel: base/strays.json lists models that ran off the run's device
    sentinel = [sys.executable, str(ROOT / "tests" / "device_sentinel.py"), str(base / "strays.json")]
    done = subprocess.run(
        [*sentinel, "run", "--config", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (base / "run" / "console.txt").write_text(done.stderr)  # rich prints the summary beside the progress bars
    return config, base / "run", env


# Fixtures that run `refcal` end to end in a subprocess (e2e here, `scanned` in test_scan.py): every test that
# uses one pays for the whole pipeline, so it is marked e2e and `make test-fast` leaves it out. Modules that
# are e2e by nature (launch, kill, the real model) say so themselves with `pytestmark`.
E2E_FIXTURES = {"e2e", "scanned"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
