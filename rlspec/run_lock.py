"""One process trains in a run directory at a time.

:class:`RunLock` holds an OS file lock (``filelock``: ``flock`` on ``<run_dir>/.rlspec.lock``) for
the whole run. The kernel drops it when the holder dies, even by ``kill -9``, so a lock is never
stale. Beside it ``.rlspec.lock.json`` names the holder (pid, host, start time) so that a second
start can say who holds the directory. Under torchrun only rank 0 takes it (the other ranks write
nothing but their DeepSpeed shards, into rank 0's temporary checkpoint folder).

Temporary checkpoint folders carry their writer's pid in their name (``step_000004.tmp-<pid>``,
``step_000004.tmp-<pid>-deepspeed``): :func:`remove_stale_temps` removes at start-up only those
whose writer is gone, never a live process's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from rlspec.errors import RunDirBusyError

LOCK_FILE = ".rlspec.lock"
HOLDER_FILE = ".rlspec.lock.json"
_TMP_PID = re.compile(r"\.tmp-(\d+)")


def read_holder(run_dir: str | Path, wait_s: float = 2.0) -> dict[str, Any] | None:
    """The lock holder's record, or None. The holder writes it right after taking the lock, so a
    start that lost the race waits up to ``wait_s`` for it to appear (or to replace the record of a
    holder killed with -9, whose pid is dead)."""
    path = Path(run_dir) / HOLDER_FILE
    deadline = time.monotonic() + wait_s
    record = None
    while True:
        try:
            record = dict(json.loads(path.read_text()))
            here = record.get("host") == socket.gethostname()
            if not here or pid_alive(int(record.get("pid", -1))):
                return record
        except (OSError, ValueError, TypeError):
            pass
        if time.monotonic() >= deadline:
            return record
        time.sleep(0.05)


class RunLock:
    """The lock on ``run_dir`` (a context manager). :meth:`acquire` raises :class:`RunDirBusyError`
    naming the holder when another process holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunDirBusyError(self._busy_message()) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "argv": sys.argv}
        tmp = self.run_dir / f"{HOLDER_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.run_dir / HOLDER_FILE)
        return self

    def release(self) -> None:
        if not self._lock.is_locked:
            return
        holder = read_holder(self.run_dir, wait_s=0)
        if holder is not None and holder.get("pid") == os.getpid():  # still ours: the next holder writes its own
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _busy_message(self) -> str:
        holder = read_holder(self.run_dir)
        if holder is None:
            who = "another process (its pid is not recorded)"
            stop = "wait for it to finish"
        else:
            pid, host = holder.get("pid"), holder.get("host", "?")
            who = f"pid {pid} on {host}, since {holder.get('started', '?')}"
            stop = f"wait for it to finish, stop it (kill {pid}: it saves a checkpoint first)"
        return (f"run_dir={self.run_dir} is in use by another rlspec run ({who}); {stop}, "
                f"or train in another directory with run_name=...")


def writer_pid(path: Path) -> int | None:
    """The pid in a temporary folder's name (``step_N.tmp-<pid>[-part]``), or None."""
    match = _TMP_PID.search(path.name)
    return int(match.group(1)) if match else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove the temporary checkpoint folders (and files) under ``root`` whose writer process is
    dead; keep those of a live process other than this one. Returns what was removed. Call it
    with the run lock held, before this process writes any."""
    removed = []
    for leftover in sorted(root.glob("*.tmp-*")) if root.is_dir() else []:
        pid = writer_pid(leftover)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue  # being written by a live process: not ours to delete
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed
