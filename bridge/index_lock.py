"""One writer at a time in an index directory: an OS file lock that the kernel releases when its holder dies.

Every change to an index (an update, a compaction, a save) runs inside `index_lock(directory)`. A second
writer is refused at once with an error naming the holder (its pid and command line, which the holder
writes into the lock file), rather than waiting: a cron job and a person indexing into one directory is
a mistake to report, not a queue to form. A holder killed with SIGKILL holds nothing: `flock` locks die
with their process, so there is no stale lock to clean by hand.

Readers take no lock: a commit is one atomic rename of the manifest (index_files.py), so a reader sees the
index before or after it, never half of it.

Not here: what the writers do (index_files.py, index_update.py).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "writer.lock"

# directory -> [lock file descriptor, nesting depth, thread]: an update that compacts takes the lock again
_held: dict[str, list] = {}


class IndexBusyError(ValueError):
    """Another process (or thread) is writing the index."""


@contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """Hold the writer's lock of index `directory` (an existing directory) while inside the block; taken
    again by the holder's thread it nests. Raises IndexBusyError when someone else holds it."""
    key = str(directory.resolve())
    if key in _held:
        if _held[key][2] != threading.get_ident():
            raise IndexBusyError(_busy_message(directory, "another thread of this process"))
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    descriptor = _acquire(directory)
    _held[key] = [descriptor, 1, threading.get_ident()]
    try:
        yield
    finally:
        del _held[key]
        # Unlinked before it is unlocked: a process that opened this file meanwhile sees it is no longer
        # the lock file once it gets the lock (`_acquire` compares inodes), so no two hold it.
        (directory / LOCK_FILE).unlink(missing_ok=True)
        os.close(descriptor)


def _acquire(directory: Path) -> int:
    from bridge.index_files import IndexFileError  # index_files imports this module

    path = directory / LOCK_FILE
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise IndexFileError.of(path, error, action="lock the index with") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode("utf-8", "replace").strip()
            os.close(descriptor)
            raise IndexBusyError(_busy_message(directory, holder or "pid unknown")) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # its holder released it and unlinked it meanwhile: lock the new one
    try:  # who holds it, for the message a second writer gets; a full disk must not stop the lock
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()}: {_command_line()}\n".encode(), 0)
    except OSError:
        pass
    return descriptor


def _busy_message(directory: Path, holder: str) -> str:
    return (
        f"index '{directory}' is being updated by another process ({holder}); wait for it to finish, "
        "or index into another --out"
    )


def _command_line() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as file:
            words = [w.decode(errors="replace") for w in file.read().split(b"\0") if w]
    except OSError:  # not Linux
        words = [sys.executable, *sys.argv]
    line = " ".join(shlex.join(words).split())  # one line, whatever a `python -c` script holds
    return line if len(line) <= 1000 else line[:997] + "..."
