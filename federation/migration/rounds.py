"""The data-plane rounds of one DC as one sans-I/O core: ``handle(now, event) ->
list[Action]``, driven by a node's runtime (:mod:`federation.dataplane.scheduler`) and
by the simulator (:mod:`sim.hosts.migration_dc`) alike.

A migration session (:mod:`federation.migration.source`) asks for a round with
:class:`~federation.migration.vocabulary.SendRound` and learns how it went from
:class:`~federation.migration.vocabulary.RoundSent` (or
:class:`~federation.migration.vocabulary.ActionFailed` naming ``SendRound``); in between,
this core runs the round:

- v1, the window/ack protocol over the control link, whole
  (:class:`~federation.migration.round_source.V1Sending`);
- v3, the round control of HDE over AMST: the start and the target's answer, the
  resumes of a cut data path, the status of a failed round
  (:class:`~federation.migration.round_source.V3Sending`); the diff and the chunks
  themselves are the v3 data plane's, which this core tells what to do (the ``V3*``
  actions of :mod:`federation.migration.round_events`) and which reports back;
- at a target, both versions' receiving side, with the data that arrives before the
  incoming images are prepared (:class:`~federation.migration.round_target.Receiving`).

It touches no VM: pages are read and written through the page actions, which
:class:`federation.vms.actions.VmActions` carries out on a VM backend. It owns the DC's
:class:`~federation.migration.round_counters.TransferCounters`, and the dirty-tracking
mark of each migration's last round (so a migration that falls back from v3 to v1
mid-way keeps sending exactly what changed).

Its timers are ``("rounds", migration id, round, what)``. Messages: the tags of
:data:`~federation.migration.round_messages.ROUND_TAGS`; peer events ``PeerUp`` (a new
link re-sends what the old one lost) and ``PeerDown``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from federation.migration.rollout import V1, V3
from federation.migration.round_counters import TransferCounters
from federation.migration.round_events import (
    ChunkRead,
    ChunkWritten,
    CloseRound,
    DirtyCounted,
    IncomingReady,
    MigrationOver,
    RoundIoFailed,
    RoundPlanned,
    RoundReport,
    SessionView,
    ToSession,
    V3Accepted,
    V3ChunkLanded,
    V3Cut,
    V3Drop,
    V3Failed,
    V3ImageVerified,
    V3Moved,
    V3Prepared,
    V3Preparing,
    V3ReceiveFailed,
    V3RelayFallback,
    V3StreamOpened,
    V3Verified,
)
from federation.migration.round_messages import (
    PagesAck,
    PagesChunk,
    V3Preparation,
    V3Round,
    V3Status,
)
from federation.migration.round_source import (
    RESUME_BUDGET_S,
    Sending,
    V1Sending,
    V3Sending,
)
from federation.migration.round_target import Receiving
from federation.migration.vocabulary import (
    ActionFailed,
    CancelRound,
    DiscardIncoming,
    PrepareIncoming,
    Retire,
    SendRound,
    StartAtTarget,
    Unfence,
)
from mesh.core import PeerDown, PeerUp, Received, TimerFired

__all__ = ["RoundsCore", "after_vm_action"]

Action = Any
#: The session's VM actions after which a migration is over at a DC.
_ENDINGS = (Retire, Unfence, StartAtTarget, DiscardIncoming)
#: Replies and reports about a round this DC sends (each names its round).
_ABOUT_SENDING = (RoundPlanned, ChunkRead, DirtyCounted, RoundIoFailed, V3Preparing, V3Prepared,
                  V3Moved, V3Cut, V3Verified, V3Failed)


class RoundsCore:
    """See the module docstring. ``session_of(migration_id)`` is what the DC's migration
    sessions say about a migration (None: no session here)."""

    def __init__(self, me: str, session_of: Callable[[str], SessionView | None], *,
                 resume_budget: float = RESUME_BUDGET_S) -> None:
        self.me = me
        self.session_of = session_of
        #: how long a v3 round's data path may stay cut (see round_source.RESUME_BUDGET_S)
        self.resume_budget = resume_budget
        self.counters = TransferCounters()
        #: migration id -> the round this DC sends now
        self.sending: dict[str, Sending] = {}
        self.receiving = Receiving(session_of, self.counters)
        #: migration id -> the dirty generation its last round opened
        self.marks: dict[str, int] = {}
        #: migrations that sent v1 rounds (their images are closed when they end) and
        #: that had v3 state here (their end is told to the v3 data plane)
        self._v1: dict[str, None] = {}
        self._v3: dict[str, None] = {}

    # ------------------------------------------------------------------ core API

    def handle(self, now: float, event: object) -> list[Action]:
        if isinstance(event, SendRound):
            return self._start(now, event)
        if isinstance(event, CancelRound):
            round_ = self.sending.pop(event.migration_id, None)
            return [] if round_ is None else round_.stop()
        if isinstance(event, Received):
            return self._received(now, event.peer, event.message)
        if isinstance(event, TimerFired):
            return self._timer(now, event.key)
        if isinstance(event, PeerUp):
            out: list[Action] = []
            for mid, going in list(self.sending.items()):
                if going.target == event.peer:
                    out += self._step(now, mid, going, going.on_peer_up(now))
            return out
        if isinstance(event, PeerDown):
            return []  # what the link loses is re-sent when a new one comes up
        if isinstance(event, _ABOUT_SENDING):
            r = self.sending.get(event.migration_id)
            if r is None or r.round != event.round:
                return []  # the round was cancelled, or a later one runs
            if isinstance(event, (RoundPlanned, V3Prepared)):
                self.marks[event.migration_id] = event.mark
            return self._step(now, event.migration_id, r, r.handle(now, event))
        return self._receiving(now, event)

    def running(self, migration_id: str) -> int | None:
        """The version of the round this DC sends for ``migration_id`` now, if any."""
        r = self.sending.get(migration_id)
        return None if r is None else r.version

    # ------------------------------------------------------------------ sending

    def _start(self, now: float, action: SendRound) -> list[Action]:
        mid = action.migration_id
        out: list[Action] = []
        old = self.sending.pop(mid, None)
        if old is not None:  # a session asks for the next round only after the last one
            out += old.stop()
        view = self.session_of(mid)
        since = self.marks.get(mid) if action.dirty else None
        if view is None:
            return out + [ToSession(mid, ActionFailed("SendRound", f"no migration {mid!r} "
                                                      "is running here"))]
        round_: Sending
        if action.version == V1:
            round_ = V1Sending(action, view.target, now, since)
            self._v1[mid] = None
        elif action.version == V3:
            round_ = V3Sending(action, view.target, now, since, self.resume_budget)
            self._v3[mid] = None
        else:
            return out + [ToSession(mid, ActionFailed(
                "SendRound", f"this DC carries no transfer version {action.version}"))]
        self.sending[mid] = round_
        return out + self._step(now, mid, round_, round_.start(now))

    def _step(self, now: float, mid: str, r: Sending, actions: list[Action]) -> list[Action]:
        """``actions`` of round ``r``, and its end if it is over now."""
        if not r.done:
            return actions
        del self.sending[mid]
        a = r.action
        if r.error:
            self.counters.round_failed()
            return [*actions, *r.stop(),
                    RoundReport(mid, a.round, r.version, r.target, None, r.error, r.figures),
                    ToSession(mid, ActionFailed("SendRound", r.error))]
        assert r.sent is not None
        self.counters.round_sent(mid, r.version, r.sent)
        return [*actions, RoundReport(mid, a.round, r.version, r.target, r.sent, "", r.figures),
                ToSession(mid, r.sent)]

    def _received(self, now: float, peer: str, msg: object) -> list[Action]:
        if isinstance(msg, (PagesAck, V3Status)):
            r = self.sending.get(msg.migration_id)
            if r is None or r.target != peer or r.round != msg.round:
                return []  # late, or from a DC this round does not go to
            return self._step(now, msg.migration_id, r, r.on_message(now, msg))
        if isinstance(msg, PagesChunk):
            return self.receiving.on_chunk(peer, msg)
        if isinstance(msg, V3Round):
            self._v3[msg.migration_id] = None
            return self.receiving.on_round(now, peer, msg)
        if isinstance(msg, V3Preparation):
            return self.receiving.on_preparation(peer, msg)
        return []

    def _timer(self, now: float, key: object) -> list[Action]:
        if not (isinstance(key, tuple) and len(key) == 4 and key[0] == "rounds"):
            return []
        _, mid, round_, what = key
        if what == "prepared":
            return self.receiving.on_timer(str(mid), int(round_))
        r = self.sending.get(str(mid))
        if r is None or r.round != round_:
            return []
        return self._step(now, str(mid), r, r.on_timer(now, str(what)))

    # ------------------------------------------------------------------ receiving

    def _receiving(self, now: float, event: object) -> list[Action]:
        rx = self.receiving
        if isinstance(event, ChunkWritten):
            return rx.on_written(now, event)
        if isinstance(event, IncomingReady):
            return rx.on_ready(event.migration_id, event.error)
        if isinstance(event, (V3Accepted, V3ReceiveFailed)):
            return rx.on_accepted(event)
        if isinstance(event, (V3ChunkLanded, V3ImageVerified)):
            return rx.on_landed(now, event)
        if isinstance(event, V3StreamOpened):
            self.counters.stream_opened(event.migration_id, event.via)
            return []
        if isinstance(event, V3RelayFallback):
            self.counters.relay_fell_back()
            return []
        if isinstance(event, MigrationOver):
            return self._over(event.migration_id)
        raise TypeError(f"the rounds core takes no {type(event).__name__}: {event!r}")

    def _over(self, mid: str) -> list[Action]:
        out: list[Action] = []
        r = self.sending.pop(mid, None)
        if r is not None:
            out += r.stop()
        out += self.receiving.forget(mid)
        self.marks.pop(mid, None)
        if mid in self._v1:  # a plan that was under way at a cancel may have opened them
            del self._v1[mid]
            out.append(CloseRound(mid))
        if mid in self._v3:
            del self._v3[mid]
            out.append(V3Drop(mid))
        return out


def after_vm_action(action: object, replies: list[Any]) -> list[object]:
    """What the rounds core hears once a session's VM action was carried out: the incoming
    images are prepared (or why not), or the migration is over here."""
    if isinstance(action, PrepareIncoming):
        failed = next((r.reason for r in replies if isinstance(r, ActionFailed)), "")
        return [IncomingReady(action.migration_id, failed)]
    if isinstance(action, _ENDINGS):
        return [MigrationOver(action.migration_id)]
    return []
