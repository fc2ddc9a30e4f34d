"""Exclusive locks on a lock file, held with `fcntl.flock`, that say who holds them.

The lock file records its holder (pid, host, command line, start time) as JSON, so a process that finds
the lock taken can name who has it. The kernel releases a flock when its process dies, so a lock file
left by a killed process is simply taken over; a clean release removes the file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refcal.calibration.infra.errors import UserError


class InUseError(UserError, RuntimeError):
    """The lock is held by another live process; the message names it and says what to do."""


@contextmanager
def exclusive_lock(path: str | Path, what: str, hint: str = "") -> Iterator[None]:
    """Hold the lock at `path`, or raise InUseError at once if another process holds it.

    `what` names the thing guarded, for the error ("run folder runs/demo"); `hint` says what to do."""
    fd = _acquire(Path(path), blocking=False)
    if fd is None:
        message = f"{what} is in use by {describe(read_holder(path))}"
        raise InUseError(f"{message}; {hint}" if hint else message)
    with _held(Path(path), fd):
        yield


@contextmanager
def waiting_lock(path: str | Path, waiting_for: str) -> Iterator[None]:
    """Hold the lock at `path`, waiting for it if another process holds it (saying so once, on stderr)."""
    path = Path(path)
    fd = _acquire(path, blocking=False)
    if fd is None:
        print(f"waiting for {waiting_for}: {describe(read_holder(path))}", file=sys.stderr, flush=True)
        fd = _acquire(path, blocking=True)
    with _held(path, fd):
        yield


def _acquire(path: Path, blocking: bool) -> int | None:
    """An open, flocked descriptor of the lock file, or None when it is held and not `blocking`.

    A holder removes the file when it releases the lock, so a lock won on a file no longer at `path` is
    worthless: try again on the file that is there now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def _held(path: Path, fd: int) -> Iterator[None]:
    """Record this process as the holder (noting a holder that died without releasing), then release:
    remove the file first, while still holding the lock, so no one can take a lock on a removed file."""
    try:
        left = _read_fd(fd)
        if left:
            print(
                f"took over {path} from process {left.get('pid', '?')}, which ended without releasing it",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        os.close(fd)  # closing the last descriptor releases the flock


def holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(_command_line()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _command_line() -> list[str]:
    """This process's command line as typed: `refcal run ...`, not the Python interpreter's path."""
    argv = list(sys.argv)
    if argv and argv[0]:
        argv[0] = os.path.basename(argv[0])
    return argv


def read_holder(path: str | Path, attempts: int = 20) -> dict:
    """The holder's record; a holder that has just taken the lock may not have written it yet."""
    for _ in range(attempts):
        try:
            text = Path(path).read_text(encoding="utf-8")
            if text:
                return json.loads(text)
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    return {}


def _read_fd(fd: int) -> dict:
    data = os.pread(fd, 1 << 16, 0)
    try:
        return json.loads(data) if data else {}
    except json.JSONDecodeError:
        return {"pid": "?"}


def describe(holder: dict) -> str:
    """'process 12345 (refcal run --config x.yaml) since 2026-12-02 14:03:11', with its host when not this one."""
    if not holder:
        return "another process"
    text = f"process {holder.get('pid', '?')}"
    if holder.get("host") and holder["host"] != socket.gethostname():
        text += f" on {holder['host']}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    if holder.get("since"):
        text += f" since {holder['since']}"
    return text
