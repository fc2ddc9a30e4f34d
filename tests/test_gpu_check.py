"""bench/gpu_check.py, the script bench/gpu_check.sh runs on a GPU, runs its code path here (tiny, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["qlora"])  # the bf16 path is the same minus quantisation
def test_gpu_check_code_path_on_cpu(mode, tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    command = [sys.executable, "bench/gpu_check.py", "--mode", mode, "--tiny", "--cpu", "--steps", "3", "--batch_size", "4", "--jsonl", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["mode"] == mode and record["steps"] == 3
    assert record["step_seconds"] > 0 and record["tokens_per_second"] > 0
    assert record["reg_terms_logged"] == ["reg_collapse", "reg_keep", "reg_retain"]
    assert ("4-bit" in record["model"]) == (mode == "qlora")
