"""Locks that belong to a live process: the decode cache's entries and run directories use them.

A lock is a small file holding a POSIX record lock (``fcntl.lockf``) and, inside, who holds it (PID, host, since
when). Record locks, unlike ``flock``, belong to the process and are not inherited by the processes it forks, so a
decode worker that outlives a killed parent cannot keep the lock; the OS releases it when its holder dies, however it
dies. A holder clears the record when it releases the lock, so a record found by a process that has just taken the
lock is the trace of a holder that was killed: it is named in one line and its partial files can be removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no record locks; callers then go on unlocked (atomic renames keep files whole)
    fcntl = None


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock."""

    pid: int
    host: str
    since: str  # ISO date and time

    def __str__(self) -> str:
        here = self.host == socket.gethostname()
        return f"PID {self.pid}{'' if here else ' on ' + self.host}, since {self.since}"


class ProcessLock:
    """An exclusive lock on ``path`` held by this process until ``release`` (or its death).

    ``acquire`` never blocks; callers decide how to wait. After a successful ``acquire``, ``previous`` is the record of
    a holder that died without releasing (or None).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = None
        self.previous: Holder | None = None

    def acquire(self) -> bool:
        """Take the lock if no live process holds it; raises OSError when the lock file cannot be opened."""
        if fcntl is None:
            return True
        f = open(self.path, "a+")  # noqa: SIM115 (kept open while held: closing it would release the lock)
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self.previous = _parse(f)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self.file = f
        return True

    def holder(self) -> Holder | None:
        """The record of whoever holds the lock now (None when nobody does, or the record is not written yet)."""
        try:
            with open(self.path) as f:
                return _parse(f)
        except OSError:
            return None

    def release(self) -> None:
        """Clear the record and release the lock (a cleared record tells the next holder this one ended cleanly)."""
        if self.file is None:
            return
        try:
            self.file.seek(0)
            self.file.truncate()
            self.file.flush()
        except OSError:
            pass
        finally:
            fcntl.lockf(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def __enter__(self) -> ProcessLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(f) -> Holder | None:
    try:
        f.seek(0)
        record = json.loads(f.read() or "null")
        return Holder(int(record["pid"]), str(record["host"]), str(record["since"])) if record else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def writer_pid(name: str) -> int | None:
    """The PID in a temporary file's name (``<name>.tmp<PID>[.<ext>]``, as reslab's writers name them), or None."""
    _, sep, rest = name.rpartition(".tmp")
    pid = rest.split(".", 1)[0]
    return int(pid) if sep and pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def die_with_parent(parent: int) -> None:
    """In a worker process: exit when ``parent`` does (Linux ``PR_SET_PDEATHSIG``; elsewhere a watcher thread), so
    a killed parent leaves no orphaned workers behind."""
    import signal
    import sys
    import threading
    import time

    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
