"""A durable key/value store for a node: SQLite, implementing :class:`mesh.core.Store`.

The database runs in WAL mode with ``synchronous=FULL``: a ``put(..., sync=True)``
returns only after the write-ahead log is fsynced, so it survives a crash or a
power loss (SQLite documentation, "PRAGMA synchronous": in WAL mode FULL syncs
the WAL after each transaction). A ``put(..., sync=False)`` commits with
``synchronous=NORMAL``, which in WAL mode is consistent after a crash but may
lose the last transactions on power loss; that is what ``Persist.sync=False``
promises.

``put_many`` writes several records in one transaction, so a burst of writes
costs one fsync (the runtime's group commit, :mod:`mesh.runtime.hosting`).

The runtime calls ``put`` from worker threads (``trio.to_thread``) so an fsync
never stalls the event loop; one lock serialises the connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

__all__ = ["SQLiteStore", "StoreError", "StoreFull"]

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"


class StoreError(Exception):
    """The store file cannot be opened or used."""


class StoreFull(StoreError):
    """The disk holding the store is full: nothing of the write was kept (its transaction
    was rolled back), and the same write may be made again once there is room."""


def _full(exc: sqlite3.Error) -> bool:
    return (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "disk is full" in str(exc))


#: Free space below which an I/O error at open is taken for a full disk: opening a WAL
#: database creates its 32 KiB shared-memory index, whose allocation fails on a full
#: file system as SQLITE_IOERR_SHMSIZE ("disk I/O error"), not SQLITE_FULL.
ROOM_TO_OPEN = 1 << 20


def _no_room(path: Path) -> bool:
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < ROOM_TO_OPEN


class SQLiteStore:
    """Key/value records in one SQLite file (``<data dir>/node.sqlite3`` in a node)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        db = None
        try:
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=5.0
            )
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if _full(exc) or (isinstance(exc, sqlite3.OperationalError) and _no_room(self.path)):
                # nothing was changed: the same open succeeds once there is room
                raise StoreFull(f"{self.path}: cannot open the store: the disk is full "
                                f"({exc})") from exc
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from exc
        self._db = db
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")

    def get(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        if not isinstance(key, str) or not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"store keys are str and values bytes, got {type(key)}, {type(value)}")
        with self._lock:
            if not sync:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute(
                    "INSERT INTO kv (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, bytes(value)),
                )
            except sqlite3.OperationalError as exc:
                self._undo()
                if _full(exc):
                    raise StoreFull(f"{self.path}: writing {key!r}: {exc}") from exc
                raise
            finally:
                if not sync:
                    self._db.execute("PRAGMA synchronous=FULL")

    def put_many(self, items: list[tuple[str, bytes]], sync: bool = True) -> None:
        """Write every (key, value) of ``items`` in order in one transaction: one
        WAL commit, so one fsync with ``sync`` (group commit), all or nothing."""
        for key, value in items:
            if not isinstance(key, str) or not isinstance(value, (bytes, bytearray)):
                raise TypeError(f"store keys are str and values bytes, got {type(key)}, "
                                f"{type(value)}")
        with self._lock:
            if not sync:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._transaction(
                    "INSERT INTO kv (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    [(key, bytes(value)) for key, value in items],
                    f"writing {len(items)} records")
            finally:
                if not sync:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _transaction(self, sql: str, rows: list[tuple[object, ...]], what: str) -> None:
        """``sql`` for every row of ``rows`` in one transaction (the lock held): all or
        none; a full disk raises :class:`StoreFull` with nothing of it kept."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
            except BaseException:
                self._undo()  # SQLITE_FULL rolls it back itself: ROLLBACK would fail
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            # a COMMIT that failed (SQLITE_FULL: the WAL could not grow) may leave the
            # transaction open: rolled back here, so the same change can be made again
            self._undo()
            if _full(exc):
                raise StoreFull(f"{self.path}: {what}: {exc}") from exc
            raise

    def _undo(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def delete_many(self, keys: list[str]) -> None:
        """Delete every key of ``keys`` (absent ones are no error) in one transaction:
        all or none. A full disk (the WAL could not grow) raises :class:`StoreFull` with
        nothing deleted, so the same delete can be made again later."""
        if not keys:
            return
        with self._lock:
            self._transaction("DELETE FROM kv WHERE key = ?", [(key,) for key in keys],
                              f"deleting {len(keys)} records")

    def keys(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, in sorted order."""
        out: list[str] = []
        with self._lock:
            rows = self._db.execute("SELECT key FROM kv WHERE key >= ? ORDER BY key", (prefix,))
            for (key,) in rows:
                if not key.startswith(prefix):
                    break
                out.append(key)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()
