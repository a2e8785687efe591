"""One node per data directory: an exclusive ``flock`` on ``<data dir>/node.lock``.

Two processes on one data directory would run one DC's identity twice: two PBFT
replicas signing as one DC (equivocation in everyone's eyes) over one SQLite log, two
owners of the same VM images. The lock is taken before anything in the directory is
read and held for the life of the process; the kernel drops it when the process ends,
however it ends (``kill -9`` included), so a stale lock file never blocks a restart.

The file holds the holder's PID, written after the lock is taken, so the second process
can name it. A crash right after the truncate leaves an empty file: the next start
takes the lock (the kernel released it) and writes its own PID; a second process that
reads the file in that instant names the PID as unknown, never a wrong one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from federation.node.errors import NodeError

__all__ = ["DataDirLock", "DataDirBusy", "LOCK_NAME"]

LOCK_NAME = "node.lock"


class DataDirBusy(NodeError):
    """Another process holds the data directory; ``pid`` is its PID (None if unknown)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class DataDirLock:
    """Holds the exclusive lock of ``data_dir`` from construction until :meth:`release`;
    raises :class:`DataDirBusy` naming the holder's PID if another process has it."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"process {pid}" if pid is not None else "another process (PID unknown)"
            raise DataDirBusy(f"data directory {data_dir} is in use by {holder} (it holds "
                              f"{self.path}); one node per data directory", pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (the file stays; its PID is stale once unlocked)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
