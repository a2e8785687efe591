"""The replica's durable log, over any :class:`mesh.core.Store`.

What a replica must not forget across a crash (Castro & Liskov, TOCS'02 §4.3:
a replica "must not send conflicting messages after it recovers", and the P
and Q sets and what has committed survive recovery, §4.4-4.5). Each kind of
fact has keys of its own, so that no write of one kind can replace another:

========================  =============================================================
key                       record
========================  =============================================================
``pbft/view``             :class:`ViewRecord`: the view, whether it is active, and the
                          NEW-VIEW that started it (none in view 0 or while changing)
``pbft/checkpoint``       :class:`CheckpointRecord`: the stable checkpoint, its ledger
                          snapshot and the 2f+1 signed CHECKPOINTs that prove it
                          (a snapshot larger than one chunk: :class:`ChunkedCheckpoint`,
                          its chunks under ``pbft/snapshot/<a>/<i>``, see below)
``pbft/pp/<r>``           :class:`PrePrepareRecord`: Q, the PRE-PREPARE accepted for
                          the sequence number (outside a NEW-VIEW), with its batch
``pbft/prepared/<r>``     :class:`PreparedRecord`: P, the prepared certificate of the
                          highest view in which the sequence number prepared here
``pbft/committed/<r>``    :class:`CommittedRecord`: the commit certificate: the
                          sequence number is decided (and executes in order)
========================  =============================================================

``<r>`` is the sequence number modulo ``SLOT_RING``. The invariant each write
keeps, and what a crash right after it leaves behind:

- ``pbft/view`` (synced) when a view change starts, before the VIEW-CHANGE goes
  out: the view never goes back. A crash after it restarts the replica in the
  view change, which signs its VIEW-CHANGE again from P (which holds every
  certificate the lost one carried).
- ``pbft/view`` with the NEW-VIEW (synced) when the replica enters a view,
  before anything of that view goes out (the primary logs its NEW-VIEW before
  sending it, so it can never make a second, different one). The NEW-VIEW's
  PRE-PREPAREs are the replica's Q for those sequence numbers in that view; they
  are not written again one by one, and nothing of P or the commit certificates
  is touched. A crash after it restarts the replica in the view, with those
  PRE-PREPAREs accepted, and the NEW-VIEW to hand to any replica behind.
- ``pbft/pp`` (synced) before the replica's PREPARE (as primary, before its
  PRE-PREPARE) goes out. It replaces only a PRE-PREPARE of an earlier view for
  the same sequence number. A crash after it restarts the replica with that
  PRE-PREPARE accepted: it never accepts (or proposes) another digest there.
- ``pbft/prepared`` (synced) before the replica's COMMIT goes out. It replaces
  only a prepared certificate of an earlier view. A crash after it keeps the
  certificate for every later VIEW-CHANGE (the P set): a sequence number that
  committed anywhere has such certificates at f+1 correct replicas, so every
  later NEW-VIEW re-proposes its digest.
- ``pbft/committed`` (not synced: the next synced write carries it) once the
  sequence number is decided. Nothing else is ever written to its key until the
  stable checkpoint passes the sequence number. A crash may lose it (and any
  write after the last synced one): the replica then holds the prepared
  certificate written before its COMMIT went out, and learns the decision again
  from its peers (state transfer with the commit certificate) or commits it
  again in a later view; executing it again is deterministic.
- ``pbft/checkpoint`` (synced) when a checkpoint becomes stable; it only moves
  forward. Records at or below it are dead, and their keys are reused: a key is
  written for seq n only while n is at most ``SLOT_RING`` above the logged
  checkpoint, so the record it replaces is for n - ``SLOT_RING`` or lower, at
  or below the checkpoint. A crash after it restarts from the snapshot.
  A snapshot larger than one chunk (:mod:`consensus.snapshot_chunks`, a ledger of
  thousands of VMs) is written as its chunks (not synced) under
  ``pbft/snapshot/<a>/<i>``, in the one of the two areas ``a`` (0, 1) that the logged
  checkpoint does not use, then the :class:`ChunkedCheckpoint` (synced) that names the
  area and every chunk's hash. A crash before that record keeps the logged checkpoint
  and its area intact; the load checks every chunk against its hash.

The replica writes through ``Persist`` actions, which the driver executes in
order before any later action of the same step is sent, and reads the log once
at start-up through :meth:`ReplicaLog.load` (:mod:`consensus.pbft.recovery`).

A real node passes its SQLite store (:class:`mesh.runtime.sqlite_store.SQLiteStore`:
WAL journal, ``synchronous=FULL``, so a synced ``Persist`` survives kill -9 and
power loss; the writes commit in order); the simulator passes its
crash-consistent :class:`sim.store.SimStore`. Both implement :class:`mesh.core.Store`.
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

import attrs

from consensus import snapshot_chunks
from consensus.pbft.messages import Envelope, PreparedCert, Signed
from consensus.snapshot_chunks import (
    MAX_CHUNKS,
    MAX_SNAPSHOT,
    chunk_count,
    chunk_hashes,
    chunk_of,
)
from mesh import wire
from mesh.core import Persist, Store
from mesh.wire import U64, Bool, Bytes, ListOf, Optional, Struct, field

__all__ = [
    "SLOT_RING",
    "ViewRecord",
    "CheckpointRecord",
    "ChunkedCheckpoint",
    "PrePrepareRecord",
    "PreparedRecord",
    "CommittedRecord",
    "Recovered",
    "ReplicaLog",
    "LogFormatError",
]

#: Two watermark windows (2 x 256, TOCS'02 §8 "log size L = 256"): a replica logs
#: pre-prepares and prepared certificates only inside its window (L above the
#: checkpoint) and decisions learned by state transfer at most L further.
SLOT_RING = 512
_SIGNED_LIST = ListOf(Struct(Signed), 64)
_BATCH = Bytes(wire.ABSOLUTE_MAX_SIZE - 65536)
#: the tag of the view record before it carried the NEW-VIEW (issue 14)
_OLD_VIEW_TAG = "pbft.log.view"


class LogFormatError(Exception):
    """The store holds a log this version cannot read safely."""


@wire.message("pbft.log.view-2", max_size=wire.ABSOLUTE_MAX_SIZE)
class ViewRecord:
    """(The "-2": the record of the old format had no NEW-VIEW, see :class:`LogFormatError`.)"""

    view: int = field(U64())
    active: bool = field(Bool())
    #: the signed NEW-VIEW that started ``view`` (None in view 0 and while changing)
    new_view: Signed | None = field(Optional(Struct(Signed)))


@wire.message("pbft.log.checkpoint", max_size=wire.ABSOLUTE_MAX_SIZE)
class CheckpointRecord:
    seq: int = field(U64())
    snapshot: bytes = field(Bytes(wire.ABSOLUTE_MAX_SIZE - 8192))
    proof: tuple[Signed, ...] = field(_SIGNED_LIST)


@wire.message("pbft.log.checkpoint-chunked", max_size=wire.ABSOLUTE_MAX_SIZE)
class ChunkedCheckpoint:
    """The stable checkpoint whose snapshot is larger than one chunk: its chunks are
    in ``pbft/snapshot/<area>/<i>``."""

    seq: int = field(U64())
    proof: tuple[Signed, ...] = field(_SIGNED_LIST)
    area: int = field(U64(1))
    size: int = field(U64(MAX_SNAPSHOT))
    chunk_hashes: tuple[bytes, ...] = field(ListOf(Bytes(32, exact=True), MAX_CHUNKS))


@wire.message("pbft.log.pre-prepare", max_size=wire.ABSOLUTE_MAX_SIZE)
class PrePrepareRecord:
    seq: int = field(U64())
    preprepare: Signed = field(Struct(Signed))
    batch: bytes = field(_BATCH)  # empty: not held (fetched by digest when needed)


@wire.message("pbft.log.prepared", max_size=wire.ABSOLUTE_MAX_SIZE)
class PreparedRecord:
    seq: int = field(U64())
    cert: PreparedCert = field(Struct(PreparedCert))
    batch: bytes = field(_BATCH)


@wire.message("pbft.log.committed", max_size=wire.ABSOLUTE_MAX_SIZE)
class CommittedRecord:
    seq: int = field(U64())
    commits: tuple[Signed, ...] = field(_SIGNED_LIST)
    batch: bytes = field(_BATCH)


_Rec = TypeVar("_Rec", PrePrepareRecord, PreparedRecord, CommittedRecord)


@attrs.frozen
class Recovered:
    view: ViewRecord
    checkpoint: CheckpointRecord | None
    #: each above the checkpoint, in sequence order
    preprepares: tuple[PrePrepareRecord, ...]
    prepared: tuple[PreparedRecord, ...]
    committed: tuple[CommittedRecord, ...]

    @property
    def new_view(self) -> Envelope | None:
        s = self.view.new_view
        return None if s is None else Envelope(s.sender, s.body, s.sig)


class ReplicaLog:
    """Typed records of one replica over a key/value :class:`Store`; it makes the
    ``Persist`` actions the replica emits, and keeps the stable checkpoint it last
    asked to log (the bound on which ring keys may be written)."""

    VIEW_KEY = "pbft/view"
    CHECKPOINT_KEY = "pbft/checkpoint"
    PREPREPARE_PREFIX = "pbft/pp/"
    PREPARED_PREFIX = "pbft/prepared/"
    COMMITTED_PREFIX = "pbft/committed/"
    SNAPSHOT_PREFIX = "pbft/snapshot/"
    #: keys of the log format before certificates had keys of their own (issue 14)
    OLD_SLOT_PREFIX = "pbft/slot/"

    def __init__(self, store: Store) -> None:
        self.store = store
        self.low = 0
        #: the chunk area the logged checkpoint uses (None: its snapshot is in its record)
        self.area: int | None = None
        #: chunks held in each area (the stale ones beyond a new snapshot are blanked)
        self._area_chunks = [0, 0]

    def load(self) -> Recovered:
        """Read what survived. A record that does not decode is a corrupt store, and a
        log in the old one-record-per-slot format cannot prove what it prepared: both
        raise (:class:`mesh.wire.WireError`, :class:`LogFormatError`)."""
        raw = self.store.get(self.VIEW_KEY)
        if self.store.keys(self.OLD_SLOT_PREFIX) or (raw and wire.peek_tag(raw) == _OLD_VIEW_TAG):
            raise LogFormatError(
                "the store holds a PBFT log in the format before issue 14 (one record per "
                "sequence number, no NEW-VIEW), which cannot prove what it prepared; start "
                "this DC from an empty data directory so it recovers from its peers")
        view = wire.decode(raw, expect=(ViewRecord,)) if raw else ViewRecord(0, True, None)
        raw = self.store.get(self.CHECKPOINT_KEY)
        ckpt = self._load_checkpoint(raw) if raw else None
        self.low = ckpt.seq if ckpt else 0
        return Recovered(
            view, ckpt,
            self._ring(self.PREPREPARE_PREFIX, PrePrepareRecord),
            self._ring(self.PREPARED_PREFIX, PreparedRecord),
            self._ring(self.COMMITTED_PREFIX, CommittedRecord),
        )

    def _area_key(self, area: int, index: int) -> str:
        return f"{self.SNAPSHOT_PREFIX}{area}/{index:04d}"

    def _load_checkpoint(self, raw: bytes) -> CheckpointRecord:
        for area in (0, 1):
            self._area_chunks[area] = sum(
                1 for k in self.store.keys(f"{self.SNAPSHOT_PREFIX}{area}/") if self.store.get(k))
        rec = wire.decode(raw, expect=(CheckpointRecord, ChunkedCheckpoint))
        if isinstance(rec, CheckpointRecord):
            return rec
        assert isinstance(rec, ChunkedCheckpoint)
        if (len(rec.chunk_hashes) != chunk_count(rec.size)
                or rec.size <= snapshot_chunks.CHUNK):
            raise wire.WireError(f"pbft.log.checkpoint-chunked: {len(rec.chunk_hashes)} chunk"
                                 f" hashes for {rec.size} bytes")
        chunks = []
        for i, h in enumerate(rec.chunk_hashes):
            data = self.store.get(self._area_key(rec.area, i)) or b""
            if hashlib.sha256(data).digest() != h:
                raise wire.WireError(f"pbft.log.checkpoint-chunked: chunk {i} of area"
                                     f" {rec.area} does not match its hash")
            chunks.append(data)
        snapshot = b"".join(chunks)
        if len(snapshot) != rec.size:
            raise wire.WireError(f"pbft.log.checkpoint-chunked: chunks of {len(snapshot)}"
                                 f" bytes, the record says {rec.size}")
        self.area = rec.area
        return CheckpointRecord(rec.seq, snapshot, rec.proof)

    def _ring(self, prefix: str, cls: type[_Rec]) -> tuple[_Rec, ...]:
        found: list[_Rec] = []
        for key in self.store.keys(prefix):
            raw = self.store.get(key)
            if raw:
                rec = wire.decode(raw, expect=(cls,))
                assert isinstance(rec, cls)
                if rec.seq > self.low:
                    found.append(rec)
        found.sort(key=lambda r: r.seq)
        return tuple(found)

    def _key(self, prefix: str, seq: int) -> str:
        if not self.low < seq <= self.low + SLOT_RING:
            raise ValueError(f"seq {seq} is outside the log's ring above checkpoint {self.low}")
        return f"{prefix}{seq % SLOT_RING:03d}"

    def fits(self, seq: int) -> bool:
        """Whether ``seq`` has a ring key now (it is above the checkpoint, and at most
        ``SLOT_RING`` above it)."""
        return self.low < seq <= self.low + SLOT_RING

    def view(self, view: int, active: bool, new_view: Envelope | None = None) -> Persist:
        nv = None if new_view is None else new_view.signed
        return Persist(self.VIEW_KEY, wire.encode(ViewRecord(view, active, nv)))

    def checkpoint(self, rec: CheckpointRecord,
                   hashes: tuple[bytes, ...] | None = None) -> list[Persist]:
        """The writes that log ``rec``: its record, or for a snapshot larger than one
        chunk, its chunks in the free area and then the record naming them (see the
        module docstring). ``hashes``: the snapshot's chunk hashes, if known."""
        self.low = max(self.low, rec.seq)
        size = len(rec.snapshot)
        if size <= snapshot_chunks.CHUNK:
            self.area = None
            return [Persist(self.CHECKPOINT_KEY, wire.encode(rec))]
        area = 1 if self.area == 0 else 0
        if hashes is None:
            hashes = chunk_hashes(rec.snapshot)
        n = len(hashes)
        writes = [Persist(self._area_key(area, i), chunk_of(rec.snapshot, i), sync=False)
                  for i in range(n)]
        writes += [Persist(self._area_key(area, i), b"", sync=False)
                   for i in range(n, self._area_chunks[area])]
        self._area_chunks[area] = n
        writes.append(Persist(self.CHECKPOINT_KEY, wire.encode(
            ChunkedCheckpoint(rec.seq, rec.proof, area, size, hashes))))
        self.area = area
        return writes

    def preprepare(self, seq: int, preprepare: Signed, batch: bytes | None) -> Persist:
        rec = PrePrepareRecord(seq, preprepare, batch or b"")
        return Persist(self._key(self.PREPREPARE_PREFIX, seq), wire.encode(rec))

    def prepared(self, seq: int, cert: PreparedCert, batch: bytes | None) -> Persist:
        rec = PreparedRecord(seq, cert, batch or b"")
        return Persist(self._key(self.PREPARED_PREFIX, seq), wire.encode(rec))

    def committed(self, seq: int, commits: tuple[Signed, ...], batch: bytes | None) -> Persist:
        """Not synced (see the module docstring)."""
        rec = CommittedRecord(seq, commits, batch or b"")
        return Persist(self._key(self.COMMITTED_PREFIX, seq), wire.encode(rec), sync=False)
