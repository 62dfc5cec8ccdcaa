"""One writer per output folder: an exclusive lock on OUTPUT_DIR/.fcmae.lock, held by a run's main process.

Two runs in one folder (a requeued job that starts beside its old self, or a typo'd --output-dir) would share
checkpoint names and mix their metrics. The lock refuses the second one and names the first.

It is a POSIX record lock (fcntl F_SETLK, Python's `fcntl.lockf`), not `flock`: the kernel drops it when the holder
exits however it dies, so a stale lock file from a killed run is simply taken over; forked children (DataLoader
workers) do not inherit it, so a dying run's workers cannot keep it; and NFS shares it between nodes (NLM / NFSv4
locks; a crashed node's lock lasts until the server's lease ends, about 90 s). The file itself stays: it holds
the holder's pid, host and start time for the message, and deleting a lock file races with the next locker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import UserError
from . import names
from .output import OutputError

__all__ = ["FolderLock", "FolderInUse"]


class FolderInUse(UserError):
    """Another live run holds the output folder's lock; the message names its process."""


class FolderLock:
    """`acquire()` takes OUTPUT_DIR's lock or raises FolderInUse; `release()` (or the process's exit) frees it."""

    held_by_process: set["FolderLock"] = set()  # for `release_all`, at the end of a command

    def __init__(self, folder: str | os.PathLike, flag: str = "--output-dir"):
        self.path = Path(folder) / names.LOCK
        self.flag = flag
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self.held:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK (NFSv3 without lockd), ENOSYS, EOPNOTSUPP, ...
                os.close(fd)
                raise OutputError(e.errno, f"cannot lock {self.path}: the file system of {self.flag} does not support "
                                           f"locks ({e.strerror}); mount it with locking (NFS: lockd / NFSv4, Lustre: "
                                           f"-o flock) or choose another {self.flag}") from None
            holder = self._holder(fd)  # read through the same descriptor: closing another one would drop our locks
            os.close(fd)
            raise FolderInUse(f"{self.path.parent} is in use by another run ({holder}); wait for it to end, stop it, "
                              f"or choose another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        self._fd = fd
        FolderLock.held_by_process.add(self)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
        FolderLock.held_by_process.discard(self)

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds (a command that ends by an error before its run's own release;
        matters when commands run inside one process, as in the tests)."""
        for lock in list(cls.held_by_process):
            lock.release()

    @staticmethod
    def _holder(fd: int) -> str:
        """'pid 123 on host-a, started 2026-12-03 10:00:00' from the lock file, or what is known of it."""
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"pid {info['pid']} on {info['host']}, started {started}"
        except (ValueError, KeyError, TypeError, OSError):  # written by a run that is still starting
            return "a process that is starting"
