"""Atomic writes: a failed write leaves the previous artifact (or nothing) and no staging debris."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from refcal.calibration.infra.artifacts import atomic_directory, atomic_save_tensors, atomic_write_text


def test_directory_appears_whole_on_success(tmp_path):
    target = tmp_path / "stage"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not target.exists()  # nothing under the final name until the block ends
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_failed_directory_keeps_the_previous_one(tmp_path):
    target = tmp_path / "stage"
    with atomic_directory(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("killed mid-stage")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_a_second_writer_keeps_the_first_whole_directory(tmp_path):
    # two processes filling one cache entry: the one that finishes second leaves the first one's folder in
    # place, files and all, since a reader may already have it open
    target = tmp_path / "entry"
    with atomic_directory(target, replace=False) as second:
        (second / "weights.txt").write_text("second")
        with atomic_directory(target, replace=False) as first:
            (first / "weights.txt").write_text("first")
        held = (target / "weights.txt").open()
    assert held.read() == "first" and (target / "weights.txt").read_text() == "first"
    held.close()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_failed_file_writes_leave_nothing(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError):
        atomic_save_tensors({"x": "not a tensor"}, path)  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []
    atomic_save_tensors({"x": torch.ones(3)}, path)
    atomic_write_text(tmp_path / "t.json", "{}")
    assert torch.equal(load_file(path)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.safetensors"]


def test_artifacts_get_plain_permissions(tmp_path):
    import os
    import stat

    from refcal.calibration.infra.artifacts import atomic_directory, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "stage") as staging:
            (staging / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == 0o755


def test_stale_staging_folders_and_files_of_a_killed_run_are_removed(tmp_path):
    from refcal.calibration.infra.artifacts import remove_stale_staging

    (tmp_path / ".train-abc123").mkdir()
    (tmp_path / ".train-abc123" / "part").write_text("half")
    (tmp_path / ".profile.json-x1y2").write_text("{")  # a temporary file killed before its rename
    (tmp_path / "profile.json").write_text("{}")
    (tmp_path / ".other-keep").write_text("not ours")
    removed = remove_stale_staging(tmp_path, ["train", "profile.json"])
    assert sorted(p.name for p in removed) == [".profile.json-x1y2", ".train-abc123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-keep", "profile.json"]
