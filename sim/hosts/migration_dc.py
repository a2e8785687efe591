"""One simulated DC of ``migration-chaos``: the real node core, hosted with a simulated
VM backend and a simulated data plane.

:class:`DcHost` is the core the world mounts on a node. It holds the
:class:`federation.migration.dc_core.NodeCore` a real node runs (the PBFT replica over the
node's crash-consistent store, and the migration sessions), feeds it every event,
and carries out the sessions' non-network actions the way ``federation.node.assembly`` does
with the image backend and the AMST data plane, but on :mod:`sim.hosts.migration_vms`:

- ``Fence`` / ``Verify`` answer with the root of the pages after the time hashing takes
  at ``VERIFY_RATE``; ``Unfence``, ``Retire``, ``PrepareIncoming``, ``StartAtTarget`` and
  ``DiscardIncoming`` change the copies at once (each is idempotent, as
  :mod:`federation.migration.restore` needs);
- a ``SendRound`` sends the round's pages (all of them in round 1, the pages dirtied
  since the previous round began after that) as :class:`SimPages` chunks, whose size on
  the wire is the pages' real size, so the link's bandwidth decides how long a round
  takes; the target writes them into its incoming copy and acks each chunk; unacked
  chunks are re-sent; the last ack ends the round with ``RoundSent``.

At every (re)start the host rebuilds the core from the store, hands it every persisted
session record (the restore rules resume or abort them) and boots the VMs this DC owns
in its ledger that are neither fenced nor retired — what a real node does after a crash.

``bug`` injects a fault into the host for tests of the oracle: ``"start-before-commit"``
starts the target's copy as soon as it verifies, ``"run-after-fence"`` leaves a fenced
VM running, ``"skip-final-round"`` sends no pages in the final round and has the target
trust the source's root instead of recomputing it.

A VM that starts running here while this DC's ledger says another DC owns it is a
violation, recorded at once (:meth:`DcHost._running`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs

from consensus.pbft.replica import Replica
from federation.migration.dc_core import TAGS, NodeCore
from federation.migration.vocabulary import (
    VERIFY_RATE,
    ActionFailed,
    CancelRound,
    DiscardIncoming,
    Fence,
    PrepareIncoming,
    Retire,
    RoundSent,
    SendRound,
    SourceFenced,
    StartAtTarget,
    TargetVerified,
    TransferProgress,
    Unfence,
    Verify,
    record_key,
)
from mesh import wire
from mesh.core import Action, CancelTimer, Event, Received, Send, SetTimer, TimerFired
from mesh.hde.image import PAGE_SIZE
from mesh.links.modes import Mode
from mesh.wire import U64, Bytes, Text, field
from sim.hosts.migration_vms import PAGES, VmCopy, VmWorld, pages_root

__all__ = ["DcHost", "SimPages", "SimPagesAck", "HOST_TAGS", "CHUNK_PAGES"]

#: Pages per data chunk: 16 pages (64 KiB), the order of AMST's chunk size.
CHUNK_PAGES = 16
#: Unacked chunks are sent again this long after the last ack (or the send): the
#: migration control retransmission period (federation.migration.vocabulary.RETRANSMIT, 2 s) plus
#: what serializing a whole VM takes at the slowest simulated link (20 Mbit/s).
RESEND_AFTER = 2.0 + PAGES * PAGE_SIZE * 8 / 20e6

HOST_TAGS = (*TAGS, "simdata.")


@wire.message("simdata.pages", max_size=CHUNK_PAGES * PAGE_SIZE + 4096)
class SimPages:
    """A chunk of a round: page numbers (u16) and values (u64), little-endian, padded to
    the pages' real size on the wire."""

    migration_id: str = field(Text(128))
    round: int = field(U64(1000))
    chunk: int = field(U64(PAGES))
    indices: bytes = field(Bytes(2 * CHUNK_PAGES))
    values: bytes = field(Bytes(8 * CHUNK_PAGES))
    fill: bytes = field(Bytes(CHUNK_PAGES * PAGE_SIZE))

    def pages(self) -> list[tuple[int, int]] | None:
        """(page, value) pairs; None if the chunk is malformed."""
        n = len(self.indices) // 2
        if len(self.indices) != 2 * n or len(self.values) != 8 * n:
            return None
        pairs = list(zip(struct.unpack(f"<{n}H", self.indices),
                         struct.unpack(f"<{n}Q", self.values), strict=True))
        return pairs if all(p < PAGES for p, _ in pairs) else None


@wire.message("simdata.ack")
class SimPagesAck:
    migration_id: str = field(Text(128))
    round: int = field(U64(1000))
    chunk: int = field(U64(PAGES))


@attrs.define
class _Round:
    migration_id: str
    target: str
    round: int
    started: float
    unacked: dict[int, SimPages]
    pages: int
    bytes: int
    wire_bytes: int


class DcHost:
    """The core mounted as ``"node"`` on every simulated DC (see the module docstring)."""

    def __init__(self, name: str, replica: Replica, vms: VmWorld,
                 mode_of: Callable[[str], Mode | None], records: dict[str, bytes],
                 bug: str = "") -> None:
        self.me = name
        self.vms = vms
        self.bug = bug
        self.core = NodeCore(name, replica, on_ledger_done=self._done, mode_of=mode_of)
        self.core.unrestored.update(records)
        self.replica = replica
        self.rounds: dict[str, _Round] = {}
        #: target side: migration id -> the newest round seen
        self.in_round: dict[str, int] = {}
        self._replies: dict[int, tuple[str, object]] = {}
        self._token = 0
        self._exec = -1
        self.node_results: dict[int, bool | None] = {}
        self.on_ledger: Callable[[DcHost], None] | None = None

    @staticmethod
    def stored_records(store: Any) -> dict[str, bytes]:
        prefix = record_key("")
        return {k[len(prefix):]: v for k in store.keys(prefix)
                if (v := store.get(k)) is not None}

    def _done(self, request_id: int, result: Any) -> None:
        self.node_results[request_id] = None if result is None else bool(result.ok)

    # ------------------------------------------------------------------ core API

    def start(self, now: float) -> list[Action]:
        return self._run(now, self.core.start(now))

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received) and isinstance(event.message, (SimPages, SimPagesAck)):
            return self._run(now, self._on_data(now, event.peer, event.message))
        if isinstance(event, TimerFired) and isinstance(event.key, tuple) and event.key:
            if event.key[0] == "simvm":
                mid, reply = self._replies.pop(int(event.key[1]))
                return self._run(now, self.core.to_session(now, mid, reply))
            if event.key[0] == "simdata":
                return self._run(now, self._resend(now, str(event.key[1])))
        return self._run(now, self.core.handle(now, event))

    def invoke(self, now: float, fn: Callable[[NodeCore, float], list[Any]]) -> list[Action]:
        """Run ``fn(core, now)`` (a plan, a submit) and carry out what it returns."""
        return self._run(now, fn(self.core, now))

    # ------------------------------------------------------------------ effects

    def _run(self, now: float, actions: list[Any]) -> list[Action]:
        out: list[Action] = []
        for a in actions:
            more = self._effect(now, a)
            if more is None:
                out.append(a)
            else:
                out += more
        if self.replica.last_exec != self._exec:
            self._exec = self.replica.last_exec
            out += self._boot()
            if self.on_ledger is not None:
                self.on_ledger(self)
        return out

    def _later(self, now: float, delay: float, mid: str, reply: object) -> list[Action]:
        self._token += 1
        self._replies[self._token] = (mid, reply)
        return [SetTimer(("simvm", self._token), now + delay)]

    def _hash_time(self) -> float:
        return PAGES * PAGE_SIZE / VERIFY_RATE

    def _effect(self, now: float, a: object) -> list[Action] | None:
        """None: a mesh.core action for the world; else what carrying out ``a`` gives."""
        vms = self.vms
        if isinstance(a, SendRound):
            return self._send_round(now, a)
        if isinstance(a, CancelRound):
            self.rounds.pop(a.migration_id, None)
            return [CancelTimer(("simdata", a.migration_id))]
        if isinstance(a, Fence):
            copy = vms.copies.get((self.me, a.vm))
            if copy is None or copy.state == "retired":
                return self._later(now, 0.0, a.migration_id, ActionFailed("Fence", "no copy"))
            vms.fence(copy, a.migration_id)
            if self.bug == "run-after-fence":
                self._running(copy)
            return self._later(now, self._hash_time(), a.migration_id,
                               SourceFenced(pages_root(copy.pages)))
        if isinstance(a, Unfence):
            copy = vms.copies.get((self.me, a.vm))
            if copy is not None and copy.fence == a.migration_id:
                copy.fence = None
                if copy.state == "stopped":
                    self._running(copy)
            return []
        if isinstance(a, Retire):
            copy = vms.copies.get((self.me, a.vm))
            if copy is not None:
                vms.set_state(copy, "retired")
                copy.fence = None
            return []
        if isinstance(a, PrepareIncoming):
            vms.incoming.setdefault((self.me, a.migration_id), [0] * PAGES)
            return []
        if isinstance(a, Verify):
            pages = vms.incoming.get((self.me, a.migration_id))
            if pages is None:
                return self._later(now, 0.0, a.migration_id,
                                   ActionFailed("Verify", "no incoming copy"))
            root = pages_root(pages)
            session = self.core.sessions.get(a.migration_id)
            if self.bug == "skip-final-round" and session is not None:
                root = session.root
            if self.bug == "start-before-commit":
                self._install(a.vm, a.migration_id, 0)
            return self._later(now, self._hash_time(), a.migration_id, TargetVerified(root))
        if isinstance(a, StartAtTarget):
            self._install(a.vm, a.migration_id, a.epoch)
            return []
        if isinstance(a, DiscardIncoming):
            vms.incoming.pop((self.me, a.migration_id), None)
            self.in_round.pop(a.migration_id, None)
            return []
        return None

    def _install(self, vm: str, mid: str, epoch: int) -> None:
        """Start the incoming copy of ``mid`` as the VM (a repeated start changes nothing)."""
        vms = self.vms
        copy = vms.create(self.me, vm)
        pages = vms.incoming.pop((self.me, mid), None)
        copy.epoch = max(copy.epoch, epoch)
        if pages is None:
            return
        copy.pages = pages
        copy.fence = None
        copy.dirty.clear()
        if copy.state != "running":
            self._running(copy)
        fenced = vms.facts.fenced.get(mid)
        if epoch and (fenced is None or tuple(pages) != fenced[1]):
            vms.facts.fail(f"{self.me} started {vm} ({mid}) with pages that differ from what "
                           "its writer last wrote before the fence")

    def _boot(self) -> list[Action]:
        ledger = self.replica.ledger
        for copy in self.vms.at(self.me):
            if copy.state == "stopped" and copy.fence is None and ledger.owner(copy.vm) == self.me:
                self._running(copy)
        return []

    def _running(self, copy: VmCopy) -> None:
        self.vms.set_state(copy, "running")
        owner = self.replica.ledger.owner(copy.vm)
        if owner != self.me:
            self.vms.facts.fail(f"{copy.vm} started at {self.me}, whose ledger says "
                                f"{owner} owns it")

    # ------------------------------------------------------------------ data plane

    def _send_round(self, now: float, a: SendRound) -> list[Action]:
        copy = self.vms.copies.get((self.me, a.vm))
        session = self.core.sessions.get(a.migration_id)
        if copy is None or session is None:
            return self._later(now, 0.0, a.migration_id, ActionFailed("SendRound", "no copy"))
        chosen = sorted(copy.dirty) if a.dirty else list(range(PAGES))
        if a.final and self.bug == "skip-final-round":
            chosen = []
        copy.dirty = set()  # a new dirty generation starts with the round
        chunks: dict[int, SimPages] = {}
        for i in range(0, len(chosen), CHUNK_PAGES):
            part = chosen[i:i + CHUNK_PAGES]
            n = len(part)
            chunks[i // CHUNK_PAGES] = SimPages(
                a.migration_id, a.round, i // CHUNK_PAGES, struct.pack(f"<{n}H", *part),
                struct.pack(f"<{n}Q", *(copy.pages[p] for p in part)), bytes(n * PAGE_SIZE))
        logical = len(chosen) * PAGE_SIZE
        r = _Round(a.migration_id, session.target, a.round, now, chunks, len(chosen),
                   logical, 0)
        self.rounds[a.migration_id] = r
        if not chunks:
            del self.rounds[a.migration_id]
            return self._later(now, 0.0, a.migration_id,
                               RoundSent(a.round, 0, 0, 0, 0.0, len(copy.dirty)))
        return self._send_chunks(now, r)

    def _send_chunks(self, now: float, r: _Round) -> list[Action]:
        out: list[Action] = []
        for chunk in r.unacked.values():
            r.wire_bytes += len(chunk.fill) + len(chunk.indices) + len(chunk.values)
            out.append(Send(r.target, chunk))
        out.append(SetTimer(("simdata", r.migration_id), now + RESEND_AFTER))
        return out

    def _resend(self, now: float, mid: str) -> list[Action]:
        r = self.rounds.get(mid)
        return [] if r is None else self._send_chunks(now, r)

    def _on_data(self, now: float, peer: str, msg: SimPages | SimPagesAck) -> list[Any]:
        mid = msg.migration_id
        if isinstance(msg, SimPagesAck):
            r = self.rounds.get(mid)
            if r is None or peer != r.target or msg.round != r.round:
                return []
            if r.unacked.pop(msg.chunk, None) is None:
                return []
            progress = TransferProgress(r.round, (r.pages - len(r.unacked)) * PAGE_SIZE)
            out = self.core.to_session(now, mid, progress)
            if r.unacked:
                return [*out, SetTimer(("simdata", mid), now + RESEND_AFTER)]
            del self.rounds[mid]
            copy = self.vms.copies.get((self.me, self._vm_of(mid)))
            dirty = len(copy.dirty) if copy is not None else 0
            sent = RoundSent(r.round, r.pages, r.bytes, r.wire_bytes, now - r.started, dirty)
            return [*out, CancelTimer(("simdata", mid)), *self.core.to_session(now, mid, sent)]
        session = self.core.sessions.get(mid)
        pages = self.vms.incoming.get((self.me, mid))
        if session is None or pages is None or session.source != peer:
            return []
        got = msg.pages()
        if got is None or msg.round < self.in_round.get(mid, 0):
            return []  # malformed, or a chunk of a round that has ended: stale
        self.in_round[mid] = msg.round
        for index, value in got:
            pages[index] = value
        ack = Send(peer, SimPagesAck(mid, msg.round, msg.chunk))
        return [ack, *self.core.to_session(now, mid, TransferProgress(msg.round,
                                                                      len(msg.fill)))]

    def _vm_of(self, mid: str) -> str:
        session = self.core.sessions.get(mid)
        return session.vm if session is not None else ""
