"""A crash-consistent simulated store implementing :class:`mesh.core.Store`.

A write is visible to ``get`` at once (it sits in the page cache) but survives
a crash only once it is synced. ``put(..., sync=True)`` is a barrier, like an
fsync of a write-ahead log: it makes that write *and every earlier write* of
the node durable. A crash keeps the durable state and loses exactly the
writes made after the last barrier.

The crash-point search (:mod:`sim.scenarios.pbft_crashpoints`) hooks
:attr:`SimStore.after_sync`: it is called right after every synced write, and
may crash the node there (``World.crash``), so a run can stop a node exactly at
its k-th persist boundary; the world then executes none of the actions that
followed the write in the same step.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SimStore"]


class SimStore:
    def __init__(self) -> None:
        self._durable: dict[str, bytes] = {}
        #: writes since the last barrier, in write order
        self._pending: dict[str, bytes] = {}
        self.writes = 0
        self.synced_writes = 0
        self.lost_writes = 0
        #: synced ``put`` calls over the node's whole life (crashes included)
        self.barriers = 0
        #: called as ``after_sync(key, barriers)`` right after each synced ``put``
        self.after_sync: Callable[[str, int], None] | None = None

    def get(self, key: str) -> bytes | None:
        if key in self._pending:
            return self._pending[key]
        return self._durable.get(key)

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        if type(key) is not str:
            raise TypeError(f"store key must be str, got {type(key).__name__}")
        if not isinstance(value, bytes):
            raise TypeError(f"store value for {key!r} must be bytes, got {type(value).__name__}")
        self.writes += 1
        self._pending.pop(key, None)
        self._pending[key] = value
        if sync:
            self.sync()
            self.barriers += 1
            if self.after_sync is not None:
                self.after_sync(key, self.barriers)

    def sync(self) -> None:
        """Make every write so far durable."""
        self.synced_writes += len(self._pending)
        self._durable.update(self._pending)
        self._pending.clear()

    def keys(self, prefix: str = "") -> list[str]:
        found = {k for k in self._durable if k.startswith(prefix)}
        found.update(k for k in self._pending if k.startswith(prefix))
        return sorted(found)

    def unsynced(self) -> list[str]:
        """Keys written since the last barrier, in write order."""
        return list(self._pending)

    def crash(self) -> list[str]:
        """Lose every write since the last barrier; returns the keys whose writes were lost."""
        lost = list(self._pending)
        self.lost_writes += len(lost)
        self._pending.clear()
        return lost
