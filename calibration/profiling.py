"""Where a stage's time goes: named sections, timed where the work happens and collected per stage.

A section inside another is recorded under both names joined by " > ", so the top-level sections of a
stage never overlap and their sum against the stage's wall time leaves its unexplained rest."""

from __future__ import annotations

import time
from contextlib import contextmanager

_totals: dict[str, list] = {}  # name -> [seconds, calls], since the last take()
_open: list[str] = []


@contextmanager
def section(name: str):
    _open.append(name)
    full = " > ".join(_open)
    started = time.perf_counter()
    try:
        yield
    finally:
        _open.pop()
        entry = _totals.setdefault(full, [0.0, 0])
        entry[0] += time.perf_counter() - started
        entry[1] += 1


def take() -> dict[str, dict]:
    """The sections recorded since the last call, {name: {"seconds", "calls"}}, and a fresh start."""
    recorded = {name: {"seconds": round(s, 2), "calls": n} for name, (s, n) in _totals.items()}
    _totals.clear()
    return recorded
