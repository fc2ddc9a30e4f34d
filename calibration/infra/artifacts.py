"""Atomic writes: a file or folder appears whole under its final name, or not at all; and the cache folder
derived artifacts live in. Imports no torch at load time (the CLI's help reads its cache)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cache_root() -> Path:
    """Where converted models, organisms and other derived weights live (never inside the repo)."""
    return Path(os.environ.get("REFCAL_CACHE", Path.home() / ".cache" / "refcal"))


@contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a plain file's permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


@contextmanager
def atomic_directory(path: str | Path, replace: bool = True):
    """Yield a staging folder beside `path`; on success it replaces `path` in one rename. With
    `replace=False` a folder already at `path` (another process's, whole) is kept and the staging one dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            os.replace(staging, path)  # onto a folder that is not empty: fails, deletes nothing
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(directory: str | Path, names: list[str]) -> list[Path]:
    """Staging folders and temporary files a killed process left beside `directory / name` (their final
    names were never written); removed before a run starts again."""
    stale = [p for name in names for p in Path(directory).glob(f".{name}-*")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
