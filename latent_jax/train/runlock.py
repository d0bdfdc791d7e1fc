"""An exclusive lock on a run folder, so that two processes never train into the same `output_dir`.

`RunLock(folder)` takes an OS advisory lock (`fcntl.flock`) on `folder/.lock` and writes the holder's pid and host
into it. The kernel drops the lock when the holder's process ends for any reason (exit, exception, `kill -9`), so
a dead holder never leaves the folder locked: the next run simply takes it. A second process asking for a held lock
gets `RunLockedError` naming the holder's pid. Only process 0 of a multi-host job locks (the others write nothing
there but their shard of a checkpoint, which Orbax coordinates).

    with RunLock("runs/my_run"):
        ...   # train, evaluate, export
"""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """The run folder is locked by another live process."""


class RunLock:
    """Context manager holding `folder/.lock` exclusively (non-blocking: a held lock raises at once)."""

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder, self.what = pathlib.Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.folder} is in use by another {self.what} (pid {holder.get('pid', '?')} on"
                f" {holder.get('host', '?')}): wait for it to finish or stop it, or give this one another"
                f" output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(folder: str | os.PathLike) -> dict | None:
    """The pid/host of the process holding `folder`'s lock, None when it is free."""
    path = pathlib.Path(folder) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
