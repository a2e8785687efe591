"""The replica's durable log, over any :class:`mesh.core.Store`.

What a replica must not forget across a crash (Castro & Liskov, TOCS'02 §4.3,
"a replica ... must not send conflicting messages after it recovers"):

- ``pbft/view``: its view and whether that view is active;
- ``pbft/checkpoint``: its latest stable checkpoint — sequence number, the
  ledger snapshot, and the 2f+1 signed CHECKPOINTs that prove it;
- ``pbft/slot/<seq mod SLOT_RING>``: per sequence number above the checkpoint,
  the accepted PRE-PREPARE and its batch (written before its PREPARE is
  sent), the prepared certificate (before its COMMIT is sent) and the commit
  certificate (once committed).

The replica writes through ``Persist`` actions (``sync=True``, executed by
the driver before any later action of the same step is sent), and reads the
log once at start-up through :meth:`ReplicaLog.load`. Slots live in a ring of
``SLOT_RING`` keys, so the log never grows and needs no deletes: a slot key is
reused only after its old sequence number fell below the stable checkpoint.

A real node passes its SQLite store (:class:`mesh.runtime.sqlite_store.SQLiteStore`:
WAL journal, ``synchronous=FULL``, so a synced ``Persist`` survives kill -9 and
power loss); the simulator passes its crash-consistent
:class:`sim.store.SimStore`. Both implement :class:`mesh.core.Store`.
"""

from __future__ import annotations

import attrs

from consensus.pbft.messages import Signed
from mesh import wire
from mesh.core import Persist, Store
from mesh.wire import U64, Bool, Bytes, ListOf, Optional, Struct, field

__all__ = ["SLOT_RING", "SlotRecord", "CheckpointRecord", "ViewRecord", "ReplicaLog"]

#: Two watermark windows (2 x 256, TOCS'02 §8 "log size L = 256"): a slot key
#: is reused only after its previous sequence number is below the low watermark.
SLOT_RING = 512
_SIGNED_LIST = ListOf(Struct(Signed), 64)


@wire.message("pbft.log.view")
class ViewRecord:
    view: int = field(U64())
    active: bool = field(Bool())


@wire.message("pbft.log.checkpoint", max_size=wire.ABSOLUTE_MAX_SIZE)
class CheckpointRecord:
    seq: int = field(U64())
    snapshot: bytes = field(Bytes(wire.ABSOLUTE_MAX_SIZE - 8192))
    proof: tuple[Signed, ...] = field(_SIGNED_LIST)


@wire.message("pbft.log.slot", max_size=wire.ABSOLUTE_MAX_SIZE)
class SlotRecord:
    seq: int = field(U64())
    preprepare: Signed | None = field(Optional(Struct(Signed)))
    batch: bytes = field(Bytes(wire.ABSOLUTE_MAX_SIZE - 65536))
    prepares: tuple[Signed, ...] = field(_SIGNED_LIST)
    commits: tuple[Signed, ...] = field(_SIGNED_LIST)


@attrs.frozen
class Recovered:
    view: ViewRecord
    checkpoint: CheckpointRecord | None
    slots: tuple[SlotRecord, ...]


class ReplicaLog:
    """Typed records of one replica over a key/value :class:`Store`."""

    VIEW_KEY = "pbft/view"
    CHECKPOINT_KEY = "pbft/checkpoint"
    SLOT_PREFIX = "pbft/slot/"

    def __init__(self, store: Store) -> None:
        self.store = store

    def load(self) -> Recovered:
        """Read what survived; a record that does not decode is a corrupt store (raises)."""
        raw = self.store.get(self.VIEW_KEY)
        view = wire.decode(raw, expect=(ViewRecord,)) if raw else ViewRecord(0, True)
        raw = self.store.get(self.CHECKPOINT_KEY)
        ckpt = wire.decode(raw, expect=(CheckpointRecord,)) if raw else None
        low = ckpt.seq if ckpt else 0
        slots = []
        for key in self.store.keys(self.SLOT_PREFIX):
            raw = self.store.get(key)
            if raw:
                rec = wire.decode(raw, expect=(SlotRecord,))
                if rec.seq > low:
                    slots.append(rec)
        slots.sort(key=lambda r: r.seq)
        return Recovered(view, ckpt, tuple(slots))

    @classmethod
    def view_action(cls, view: int, active: bool) -> Persist:
        return Persist(cls.VIEW_KEY, wire.encode(ViewRecord(view, active)))

    @classmethod
    def checkpoint_action(cls, rec: CheckpointRecord) -> Persist:
        return Persist(cls.CHECKPOINT_KEY, wire.encode(rec))

    @classmethod
    def slot_action(cls, rec: SlotRecord) -> Persist:
        return Persist(f"{cls.SLOT_PREFIX}{rec.seq % SLOT_RING:03d}", wire.encode(rec))
