"""What the source and the target session share: the record, timers, ledger submissions
with resubmission, peer-down grace, progress and the end of a session.

See :mod:`federation.migration.vocabulary` for the protocol; this module has no protocol
decisions of its own except the common ones: a ledger command without an
outcome is resubmitted every ``LEDGER_RESUBMIT`` seconds, and a counterpart that
stays down for ``PEER_DOWN_GRACE`` aborts a session that may still abort.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

from consensus.authz import Authorization
from consensus.ledger import AbortMigration, AnnounceRoot, BeginMigration, CommitMigration
from federation.migration.vocabulary import (
    FENCE_SLACK,
    LEDGER_RESUBMIT,
    PEER_DOWN_GRACE,
    STALL_TIMEOUT,
    TERMINAL,
    VERIFY_RATE,
    ImageSize,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    MigrationError,
    Outcome,
    Phase,
    PrecopyLimits,
    Progress,
    Role,
    SessionRecord,
    SubmitLedger,
    clock_text,
    record_key,
    timer_key,
)
from federation.migration.vocabulary import (
    MigrationAction as Action,
)
from mesh import wire
from mesh.core import (
    CancelTimer,
    Notify,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    SetTimer,
    TimerFired,
)
from mesh.hde.image import PAGE_SIZE

__all__ = ["SessionBase", "TIMERS"]

TIMERS = ("ledger", "retransmit", "peer", "stall", "fence")
_LedgerCommand = BeginMigration | AnnounceRoot | CommitMigration | AbortMigration


class SessionBase(abc.ABC):
    """State both roles keep; subclasses implement ``_handle`` and ``_may_abort``."""

    role: Role

    def __init__(
        self,
        me: str,
        migration_id: str,
        vm: str,
        source: str,
        target: str,
        epoch: int,
        limits: PrecopyLimits,
        version: int,
        common: Sequence[int],
        layout: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.me = me
        self.migration_id = migration_id
        self.vm = vm
        self.source = source
        self.target = target
        self.epoch = epoch
        self.limits = limits
        self.version = version
        self.common = tuple(sorted(set(common)))
        self.layout = tuple(layout)
        self.phase = Phase.PLANNED
        self.round = 0
        self.fenced = False
        self.final_sent = False
        self.root = b""
        self.reason = ""
        self.bytes_sent = 0
        self.wire_bytes = 0
        self.pending: _LedgerCommand | None = None
        self.dirty_rate = 0.0
        self.throughput = 0.0
        self.eta = 0.0
        #: the round in flight, as its progress reports tell (the source's; zeros between
        #: rounds): when it started, what moved of it, how many pages it is expected to
        #: cover, and the estimate of the time left that the display shows
        self.round_started: float | None = None
        self.round_bytes = 0
        self.round_wire = 0
        self.round_pages = 0
        #: pages the round's preparation went over so far (TransferProgress.prepared)
        self.round_prepared = 0
        self.live_eta = math.inf
        self.fenced_at: float | None = None
        self.fenced_seconds = 0.0
        #: source: the operator's signed request the begin carries
        self.authorization: Authorization | None = None
        #: when the link to the counterpart went down (None while it is up): the abort
        #: reasons name it ("target dc3 unreachable since 12:01:07 (link down)")
        self.peer_down_since: float | None = None
        #: wall-clock seconds minus ``now`` (its driver's; 0: ``now`` is wall-clock or
        #: simulated), for the times abort reasons show
        self.wall_offset = 0.0

    # ------------------------------------------------------------------ helpers

    @property
    def peer(self) -> str:
        return self.target if self.role is Role.SOURCE else self.source

    @property
    def peer_role(self) -> str:
        """What the counterpart is to this session: "target" or "source"."""
        return "target" if self.role is Role.SOURCE else "source"

    def link_state(self, now: float) -> str:
        """The link to the counterpart, for an abort reason: "link down since HH:MM:SS"
        or "link up"."""
        if self.peer_down_since is None:
            return "link up"
        return f"link down since {clock_text(self.peer_down_since + self.wall_offset)}"

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.layout) * PAGE_SIZE

    def hash_bound(self) -> float:
        """How long hashing every image for a root may take (the fence at the source,
        verification at the target): VERIFY_RATE with FENCE_SLACK, at least STALL_TIMEOUT."""
        return max(STALL_TIMEOUT, FENCE_SLACK * self.total_bytes / VERIFY_RATE)

    def record(self) -> SessionRecord:
        return SessionRecord(
            migration_id=self.migration_id, role=self.role.value, me=self.me, vm=self.vm,
            source=self.source, target=self.target, epoch=self.epoch, phase=self.phase.value,
            round=self.round, version=self.version, common=self.common,
            layout=tuple(ImageSize(n, c) for n, c in self.layout), fenced=self.fenced,
            final_sent=self.final_sent, root=self.root, max_rounds=self.limits.max_rounds,
            downtime=float(self.limits.downtime), reason=self.reason[:256],
            bytes_sent=self.bytes_sent, wire_bytes=self.wire_bytes,
            authorization=self.authorization,
        )

    def load(self, rec: SessionRecord) -> None:
        """Take the persisted fields of ``rec`` (used by restore)."""
        self.phase = Phase(rec.phase)
        self.round = rec.round
        self.fenced = rec.fenced
        self.final_sent = rec.final_sent
        self.root = rec.root
        self.reason = rec.reason
        self.bytes_sent = rec.bytes_sent
        self.wire_bytes = rec.wire_bytes
        self.authorization = rec.authorization

    def persist(self) -> Persist:
        return Persist(record_key(self.migration_id), wire.encode(self.record()), sync=True)

    def timer(self, what: str, at: float) -> SetTimer:
        return SetTimer(timer_key(self.migration_id, what), at)

    def cancel(self, *what: str) -> list[Action]:
        return [CancelTimer(timer_key(self.migration_id, w)) for w in what]

    def submit(self, now: float, command: _LedgerCommand) -> list[Action]:
        self.pending = command
        return [SubmitLedger(command), self.timer("ledger", now + LEDGER_RESUBMIT)]

    @property
    def moved_bytes(self) -> int:
        """Page bytes sent so far, the round in flight included."""
        return self.bytes_sent + self.round_bytes

    @property
    def moved_wire(self) -> int:
        return self.wire_bytes + self.round_wire

    @property
    def shown_eta(self) -> float:
        """The estimate an operator sees: unknown (inf) before the first measurement and
        for a migration that is being or was given up, the in-round estimate while a round
        runs, the last round's after it."""
        if self.phase in (Phase.PLANNED, Phase.BEGUN, Phase.ABORTING, Phase.ABORTED,
                          Phase.REFUSED):
            return math.inf
        if self.round_started is not None:
            return self.live_eta
        return self.eta

    def progress(self) -> Notify:
        return Notify("migration.progress", Progress(
            self.migration_id, self.vm, self.role.value, self.phase.value, self.round,
            self.moved_bytes, self.moved_wire, self.dirty_rate, self.throughput,
            self.shown_eta, self.moved_bytes // PAGE_SIZE, self.round_prepared,
        ))

    def finish(self, now: float, phase: Phase, reason: str = "") -> list[Action]:
        """Enter a terminal phase: persist it, stop every timer, tell the node."""
        self.phase = phase
        if reason:
            self.reason = reason
        self.pending = None
        if self.fenced_at is not None:
            self.fenced_seconds = now - self.fenced_at
            self.fenced_at = None
        outcome = Outcome(
            self.migration_id, self.vm, self.role.value, phase.value, self.reason,
            self.round, self.bytes_sent, self.wire_bytes, self.fenced_seconds,
        )
        return [self.persist(), *self.cancel(*TIMERS), Notify("migration.done", outcome)]

    def abort(self, now: float, reason: str) -> list[Action]:
        """Give up: ask for the abort (``request_abort``) and wait for the ledger's word.
        Returns [] where an abort is no longer this side's to make (see ``_may_abort``)."""
        if not self._may_abort():
            return []
        self.phase = Phase.ABORTING
        self.reason = reason
        return [
            self.persist(),
            *self.cancel("retransmit", "peer", "stall", "fence"),
            *self._abort_side_effects(),
            *self.request_abort(now),
            Notify("migration.aborting", {"migration_id": self.migration_id, "reason": reason}),
        ]

    # ------------------------------------------------------------------ dispatch

    def handle(self, now: float, event: object) -> list[Action]:
        mid = getattr(event, "migration_id", self.migration_id)
        if isinstance(event, (LedgerBegun, LedgerCommitted, LedgerAborted)) and (
            mid != self.migration_id
        ):
            raise MigrationError(
                f"migration {self.migration_id!r} was given a ledger event for {mid!r}"
            )
        if isinstance(event, Received):
            about = getattr(event.message, "migration_id", self.migration_id)
            if about != self.migration_id:
                raise MigrationError(
                    f"migration {self.migration_id!r} was given a message about {about!r}"
                )
        if isinstance(event, TimerFired):
            key = event.key
            if not (isinstance(key, tuple) and len(key) == 3 and key[1] == self.migration_id):
                raise MigrationError(f"migration {self.migration_id!r} got foreign timer {key!r}")
            if self.done:
                return []
            if key[2] == "ledger":
                return self._resubmit(now)
            if key[2] == "peer":
                since = now - PEER_DOWN_GRACE if self.peer_down_since is None else (
                    self.peer_down_since)
                return self.abort(now, f"{self.peer_role} {self.peer} unreachable since "
                                  f"{clock_text(since + self.wall_offset)} (link down for "
                                  f"{now - since:.0f} s)")
        if isinstance(event, PeerDown) and event.peer == self.peer and not self.done:
            if self.peer_down_since is None:
                self.peer_down_since = now
            return [self.timer("peer", now + PEER_DOWN_GRACE)] if self._may_abort() else []
        if isinstance(event, PeerUp) and event.peer == self.peer:
            self.peer_down_since = None
            return self.cancel("peer")
        if isinstance(event, (PeerDown, PeerUp)):
            return []
        return self._handle(now, event)

    def _resubmit(self, now: float) -> list[Action]:
        if self.pending is None:
            return []
        return [Notify("migration.resubmit", {"migration_id": self.migration_id}),
                *self.submit(now, self.pending)]

    @abc.abstractmethod
    def _handle(self, now: float, event: object) -> list[Action]:
        """The role's reaction to every event the common dispatch did not consume."""

    @abc.abstractmethod
    def _may_abort(self) -> bool:
        """Whether this side may still submit an abort in its current phase."""

    @abc.abstractmethod
    def request_abort(self, now: float) -> list[Action]:
        """How this side asks for the abort once it gave up (also after a restart in
        ABORTING): the source submits it; the target asks the source (consensus.ledger
        takes the target's own abort only by timeout)."""

    @abc.abstractmethod
    def _abort_side_effects(self) -> list[Action]:
        """What the role stops locally when it decides to abort (e.g. a round in flight)."""
