"""Where a stage's time goes: named sections, timed where the work happens and collected per stage.

A section inside another is recorded under both names joined by " > ", so the top-level sections of a
stage never overlap and their sum against the stage's wall time leaves its unexplained rest."""

from __future__ import annotations

import time
from contextlib import contextmanager

_totals: dict[str, list] = {}  # name -> [seconds, calls], since the last take()
_notes: dict[str, dict] = {}  # name -> facts a section recorded about its work (prompts per process, ...)
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


def note(**facts) -> None:
    """Facts about the work of the innermost open section, kept beside its time (the last call's win)."""
    if _open:
        _notes.setdefault(" > ".join(_open), {}).update(facts)


def take() -> dict[str, dict]:
    """The sections recorded since the last call, {name: {"seconds", "calls", any noted facts}}, and a
    fresh start."""
    recorded = {name: {"seconds": round(s, 2), "calls": n, **_notes.get(name, {})} for name, (s, n) in _totals.items()}
    _totals.clear()
    _notes.clear()
    return recorded
