"""The target side of a migration (see :mod:`federation.migration.vocabulary`).

The node creates a target session when its ledger replica records a begin
that names this DC as the target (:meth:`TargetSession.from_ledger`); offers
for a migration the local ledger has not recorded are dropped, and the
source re-sends them. BEGUN: waiting for the offer, which says the layout and
the version. PRECOPY: the incoming images are prepared and rounds arrive
through the data plane. FINAL: the source's final round is delivered; the
target recomputes the root of what it wrote and compares it with the root the
source announced *in the ledger* (what the source's message says is not
evidence: the ledger takes a commit only with the announced root; a commit
submitted while the announcement is still on its way names the root this DC
verified, and the ledger refuses it unless the source announced the same). VERIFIED:
the roots match and the commit is submitted — from here on the target never
aborts: the ledger orders its commit against any abort of the source; meanwhile
the VM's device state is loaded (``LoadDevice``: the guest stays paused).
COMMITTED: the ledger recorded the commit; the VM starts here with the new
epoch, never earlier.

A target that gives up (a stall, its peer down, a root that does not match)
does not abort on its own: it asks the source to (``MigrationDecline``, re-sent
until the ledger decides), and submits its own abort only once the migration's
deadline has passed (``MIGRATION_DEADLINE`` after the begin; the ledger checks
it in ledger time).
"""

from __future__ import annotations

from consensus.ledger import MIGRATION_DEADLINE, AbortMigration, CommitMigration
from federation.migration.session import SessionBase
from federation.migration.vocabulary import (
    RETRANSMIT,
    STALL_TIMEOUT,
    ActionFailed,
    DiscardIncoming,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    LedgerRootAnnounced,
    LoadDevice,
    MigrationDecline,
    MigrationError,
    MigrationOffer,
    MigrationReady,
    MigrationRoundDone,
    Phase,
    PolicyChanged,
    PrecopyLimits,
    PrepareIncoming,
    Role,
    StartAtTarget,
    TargetVerified,
    TransferProgress,
    Verify,
    abort_cause,
)
from federation.migration.vocabulary import (
    MigrationAction as Action,
)
from mesh.core import Notify, Received, Send, TimerFired

__all__ = ["TargetSession"]

_ABORTABLE = (Phase.BEGUN, Phase.PRECOPY, Phase.FINAL)


class TargetSession(SessionBase):
    role = Role.TARGET

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        #: the root the source announced in the ledger, and the root recomputed here
        self.announced = b""
        self.verified = b""
        #: local time after which the ledger should take this target's own abort
        self.timeout_at = 0.0
        #: the ledger refused a commit submitted before the source's announcement was in
        #: it: submit it again when the announcement comes (once: ``commit_retried``; not
        #: persisted, a restored VERIFIED session submits its commit again anyway)
        self.commit_waits = False
        self.commit_retried = False

    def arm_timeout(self, now: float) -> None:
        self.timeout_at = now + MIGRATION_DEADLINE

    @classmethod
    def from_ledger(
        cls, me: str, migration_id: str, vm: str, source: str, epoch: int,
        limits: PrecopyLimits, now: float,
    ) -> tuple[TargetSession, list[Action]]:
        """A session for a begin the ledger recorded with this DC as the target."""
        if source == me:
            raise MigrationError(f"migration {migration_id!r}: the source is this DC")
        s = cls(me, migration_id, vm, source, me, epoch, limits, 0, ())
        s.phase = Phase.BEGUN
        s.arm_timeout(now)
        return s, [s.persist(), s.timer("stall", now + STALL_TIMEOUT), s.progress()]

    def _may_abort(self) -> bool:
        return self.phase in _ABORTABLE

    def _decline(self) -> Send:
        return Send(self.source, MigrationDecline(self.migration_id, self.reason[:256]))

    def request_abort(self, now: float) -> list[Action]:
        # The abort waits for the deadline (the ledger's timeout); until then the source
        # is asked, and an honest source aborts at once.
        self.pending = AbortMigration(self.migration_id, None, self.reason[:256],
                                      abort_cause(self.reason))
        return [self._decline(), self.timer("retransmit", now + RETRANSMIT),
                self.timer("ledger", max(now, self.timeout_at))]

    def _decide(self, now: float) -> list[Action]:
        """The received images verified: commit with their root once it is the root the
        source announced, else give up. While the announcement is still on its way through
        the ledger, commit already if the root is the one the source's final round named:
        the ledger takes the commit only once the same root is announced (it refuses one
        ordered before the announcement, and this session submits it again when the
        announcement comes), so the two ledger commands overlap instead of following each
        other in the guest's downtime."""
        if self.phase is not Phase.FINAL or not self.verified:
            return []
        if not self.announced:
            if self.verified != self.root:
                return []  # not what the source said it sent: the announcement decides
        elif self.verified != self.announced:
            return self.abort(now, "the root of the received images does not match the "
                                   "root the source announced")
        self.root = self.verified
        self.phase = Phase.VERIFIED
        # the device state loads while the ledger orders the commit: only cont waits for it
        return [self.persist(), *self.cancel("stall", "peer"),
                *self.submit(now, CommitMigration(self.migration_id, self.root)),
                LoadDevice(self.vm, self.migration_id), self.progress()]

    def _abort_side_effects(self) -> list[Action]:
        return []

    # ------------------------------------------------------------------ events

    def _handle(self, now: float, ev: object) -> list[Action]:
        if isinstance(ev, LedgerCommitted):
            if self.done:
                return []
            self.epoch = ev.epoch
            return [StartAtTarget(self.vm, self.migration_id, ev.epoch),
                    *self.finish(now, Phase.COMMITTED)]
        if isinstance(ev, LedgerAborted):
            if self.done:
                return []
            out: list[Action] = []
            if self.layout:
                out.append(DiscardIncoming(self.vm, self.migration_id))
            return out + self.finish(now, Phase.ABORTED, self.reason or "aborted in the ledger")
        if isinstance(ev, (LedgerBegun, PolicyChanged)):
            return []
        if isinstance(ev, LedgerRootAnnounced):
            self.announced = ev.root
            # logged: when the root came through the ledger is a mark of the stop window
            note = Notify("migration.root-announced", {"migration_id": self.migration_id,
                                                       "phase": self.phase.value})
            if self.phase is Phase.VERIFIED and self.commit_waits:
                # our commit was ordered before the announcement: submit it again now
                self.commit_waits, self.commit_retried = False, True
                if self.announced == self.root:
                    return [note, *self.submit(now, CommitMigration(self.migration_id,
                                                                    self.root))]
            return [note, *self._decide(now)]
        if isinstance(ev, LedgerRefused):
            refused: list[Action] = [Notify("migration.ledger-refused",
                                            {"migration_id": self.migration_id,
                                             "reason": ev.reason})]
            if (isinstance(ev.command, CommitMigration) and self.phase is Phase.VERIFIED
                    and not self.commit_retried):
                if not self.announced:
                    self.commit_waits = True  # submitted again on the announcement
                elif self.announced == self.root:
                    # the announcement came through this DC's ledger before the refusal
                    # of the commit ordered ahead of it did: submit it again now
                    self.commit_retried = True
                    refused += self.submit(now, CommitMigration(self.migration_id,
                                                                self.root))
            return refused
        if isinstance(ev, Received):
            return self._on_message(now, ev)
        if isinstance(ev, TransferProgress):
            if self.phase is Phase.PRECOPY:
                self.bytes_sent += ev.bytes
                return [self.timer("stall", now + STALL_TIMEOUT)]
            return []
        if isinstance(ev, TargetVerified):
            if self.phase is not Phase.FINAL:
                return []
            self.verified = ev.root
            decided = self._decide(now)
            if not decided:  # the announcement is on its way through the ledger
                return [self.timer("stall", now + STALL_TIMEOUT)]
            return decided
        if isinstance(ev, ActionFailed):
            if self._may_abort():
                return self.abort(now, f"{ev.action} failed: {ev.reason}")
            return [Notify("migration.error", {"migration_id": self.migration_id,
                                               "action": ev.action, "reason": ev.reason})]
        if isinstance(ev, TimerFired):
            what = ev.key[2]  # type: ignore[index]
            if what == "stall":
                return self.abort(now, f"no progress in {self.phase.value} within its "
                                  f"bound: source {self.source} sent nothing for "
                                  f"{STALL_TIMEOUT:.0f} s ({self.link_state(now)})")
            if what == "retransmit":
                if self.phase is Phase.ABORTING:
                    return [self._decline(), self.timer("retransmit", now + RETRANSMIT)]
                return []
            raise MigrationError(f"target session got unknown timer {what!r}")
        raise MigrationError(f"target session got an event it does not take: {ev!r}")

    def _on_message(self, now: float, ev: Received) -> list[Action]:
        msg = ev.message
        if ev.peer != self.source or not isinstance(msg, (MigrationOffer, MigrationRoundDone)):
            return [Notify("migration.ignored", {"migration_id": self.migration_id,
                                                 "peer": ev.peer, "message": type(msg).__name__})]
        if isinstance(msg, MigrationOffer):
            return self._on_offer(now, msg)
        if self.phase is not Phase.PRECOPY or msg.round < self.round:
            return []  # a duplicate, or a round report from before a restart
        self.round = msg.round
        if not msg.final:
            return [self.timer("stall", now + STALL_TIMEOUT), self.progress()]
        self.root = msg.root
        self.phase = Phase.FINAL
        return [self.persist(), Verify(self.vm, self.migration_id),
                self.timer("stall", now + self.hash_bound()), self.progress()]

    def _on_offer(self, now: float, offer: MigrationOffer) -> list[Action]:
        expected = (self.vm, self.source, self.target, self.epoch)
        got = (offer.vm, offer.source, offer.target, offer.epoch)
        if got != expected:
            return [Notify("migration.ignored", {
                "migration_id": self.migration_id, "peer": self.source,
                "message": f"offer {got!r} does not match the ledger's {expected!r}"})]
        ready = Send(self.source, MigrationReady(self.migration_id))
        if self.phase is Phase.PRECOPY:
            return [ready]  # our answer was lost; the source asks again
        if self.phase is not Phase.BEGUN:
            return []
        names = [i.name for i in offer.layout]
        if not names or any(i.pages == 0 for i in offer.layout) or len(set(names)) != len(names):
            return self.abort(now, f"the offer's image layout {names!r} is empty or repeats "
                                   "an image")
        self.layout = tuple((i.name, i.pages) for i in offer.layout)
        self.version = offer.version
        self.phase = Phase.PRECOPY
        return [self.persist(), PrepareIncoming(self.vm, self.migration_id, self.layout,
                                                self.version, offer.machine),
                ready, self.timer("stall", now + STALL_TIMEOUT), self.progress()]
