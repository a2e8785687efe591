"""The target side of the rounds core: what arrives for the migrations this DC receives.

A round's data is taken only from the migration's source while its target session runs
here (``session_of``); anything else is refused with the reason. The incoming images
are prepared by the VM backend after the session answered the offer, so the first
chunks (v1) or the round's start (v3) may arrive before them: they are held until the
host reports :class:`~federation.migration.round_events.IncomingReady` — at most
``2 x WINDOW`` v1 chunks per migration (the sender's window bounds what it has in
flight), and a v3 start for at most ``ACK_TIMEOUT`` — then written, accepted, or
refused if the images could not be prepared.

v1 chunks of a round older than the newest one seen are stale (a late duplicate: the
source moved on only after every chunk of that round was acknowledged) and are dropped
unwritten, so they never overwrite newer pages. A chunk written twice is acknowledged
twice; the source counts the first.

The target session hears of the data at most once a second
(:data:`~federation.migration.round_source.PROGRESS_EVERY`): that keeps its stall
timer quiet through a long round, or one riding out a cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from federation.migration.round_counters import TransferCounters
from federation.migration.round_events import (
    ChunkWritten,
    SessionView,
    ToSession,
    V3Accept,
    V3Accepted,
    V3ChunkLanded,
    V3ImageVerified,
    V3ReceiveFailed,
    WriteChunk,
)
from federation.migration.round_messages import (
    ACK_TIMEOUT,
    WINDOW,
    PagesAck,
    PagesChunk,
    V3Preparation,
    V3Round,
    V3Status,
)
from federation.migration.round_source import PROGRESS_EVERY, round_timer
from federation.migration.vocabulary import TransferProgress
from mesh.core import CancelTimer, Send, SetTimer

__all__ = ["Receiving", "EARLY_CHUNKS"]

#: v1 chunks held per migration until its incoming images are prepared: two windows
#: (the sender has at most one in flight; its resends may repeat it).
EARLY_CHUNKS = 2 * WINDOW
#: Field limits of the answers (round_messages: PagesAck.error, V3Status.error).
_ACK_ERROR, _STATUS_ERROR = 256, 512

Action = Any


class Receiving:
    """The rounds this DC receives, for every migration it is the target of."""

    def __init__(self, session_of: Callable[[str], SessionView | None],
                 counters: TransferCounters) -> None:
        self.session_of = session_of
        self.counters = counters
        #: migration id -> "" once the incoming images are prepared, else why not
        self.ready: dict[str, str] = {}
        #: migration id -> the newest v1 round seen
        self.newest: dict[str, int] = {}
        #: migration id -> v1 chunks held until the images are prepared, by (round, seq)
        self.early: dict[str, dict[tuple[int, int], tuple[str, PagesChunk]]] = {}
        #: migration id -> the v3 round start held until the images are prepared
        self.held: dict[str, tuple[str, V3Round]] = {}
        #: migration id -> (time of the last progress report, bytes since)
        self._noted: dict[str, tuple[float, int]] = {}

    def _running_from(self, mid: str, peer: str) -> SessionView | None:
        view = self.session_of(mid)
        if view is None or view.source != peer or view.done:
            return None
        return view

    @staticmethod
    def _not_running(mid: str, peer: str) -> str:
        return f"no migration {mid!r} from {peer} is running here"

    # ------------------------------------------------------------------ v1

    def on_chunk(self, peer: str, msg: PagesChunk) -> list[Action]:
        mid = msg.migration_id
        if self._running_from(mid, peer) is None:
            return self._refuse(peer, msg, self._not_running(mid, peer))
        if msg.round < self.newest.get(mid, 0):
            return []  # stale: its round was acknowledged whole before this one began
        self.newest[mid] = msg.round
        ready = self.ready.get(mid)
        if ready is None:
            early = self.early.setdefault(mid, {})
            key = (msg.round, msg.seq)
            if key in early or len(early) < EARLY_CHUNKS:
                early[key] = (peer, msg)
                return []
            return self._refuse(peer, msg, f"migration {mid!r}: the incoming images are not "
                                           "prepared")
        if ready:
            return self._refuse(peer, msg, ready)
        return [WriteChunk(peer, mid, msg.round, msg.seq, msg.image, msg.page, msg.data)]

    def on_written(self, now: float, ev: ChunkWritten) -> list[Action]:
        ack = Send(ev.peer, PagesAck(ev.migration_id, ev.round, ev.seq, ev.error[:_ACK_ERROR]))
        if ev.error:
            self.counters.chunk_refused()
            return [ack]
        self.counters.chunk_written(ev.migration_id, ev.nbytes)
        return [ack, *self._note(now, ev.migration_id, ev.round, ev.nbytes)]

    def _refuse(self, peer: str, msg: PagesChunk, why: str) -> list[Action]:
        self.counters.chunk_refused()
        return [Send(peer, PagesAck(msg.migration_id, msg.round, msg.seq, why[:_ACK_ERROR]))]

    # ------------------------------------------------------------------ v3

    def on_round(self, now: float, peer: str, msg: V3Round) -> list[Action]:
        mid = msg.migration_id
        if self._running_from(mid, peer) is None:
            return [self._status(peer, msg, self._not_running(mid, peer))]
        if mid not in self.ready:
            self.held[mid] = (peer, msg)
            return [SetTimer(round_timer(mid, msg.round, "prepared"), now + ACK_TIMEOUT)]
        return self._start_round(peer, msg)

    def _start_round(self, peer: str, msg: V3Round) -> list[Action]:
        mid = msg.migration_id
        view = self._running_from(mid, peer)
        if view is None:
            return [self._status(peer, msg, self._not_running(mid, peer))]
        if self.ready.get(mid):
            return [self._status(peer, msg, self._unprepared(msg))]
        return [V3Accept(peer, mid, msg.round, msg.transfer, msg.images, view.vm)]

    def on_preparation(self, peer: str, msg: V3Preparation) -> list[Action]:
        """The source prepares a round (round 1: copies and indexes every image): progress
        for this side's session, if the migration runs here from ``peer``."""
        if self._running_from(msg.migration_id, peer) is None:
            return []
        return [ToSession(msg.migration_id, TransferProgress(msg.round, 0, 0, 0, msg.pages))]

    def on_accepted(self, ev: V3Accepted | V3ReceiveFailed) -> list[Action]:
        why = ev.error if isinstance(ev, V3Accepted) else ev.reason
        return [Send(ev.peer, V3Status(ev.migration_id, ev.round, why[:_STATUS_ERROR]))]

    def on_landed(self, now: float, ev: V3ChunkLanded | V3ImageVerified) -> list[Action]:
        if isinstance(ev, V3ImageVerified):
            self.counters.pages_received(ev.migration_id, ev.nbytes)
            return []
        self.counters.frame_landed(ev.nbytes)
        # the pages are counted when their image is verified; this is only news that the
        # round moves, for the session's stall timer
        return self._note(now, ev.migration_id, ev.round, 0)

    def on_timer(self, mid: str, round_: int) -> list[Action]:
        held = self.held.get(mid)
        if held is None or held[1].round != round_:
            return []
        del self.held[mid]
        return [self._status(held[0], held[1], self._unprepared(held[1]))]

    @staticmethod
    def _unprepared(msg: V3Round) -> str:
        return (f"the incoming images of {msg.migration_id!r} are not prepared as "
                f"{list(msg.images)}")

    @staticmethod
    def _status(peer: str, msg: V3Round, why: str) -> Send:
        return Send(peer, V3Status(msg.migration_id, msg.round, why[:_STATUS_ERROR]))

    # ------------------------------------------------------------------ both

    def on_ready(self, mid: str, error: str) -> list[Action]:
        """The incoming images are prepared (``error``: they could not be)."""
        why = (f"migration {mid!r}: the incoming images could not be prepared ({error})"
               if error else "")
        self.ready[mid] = why
        out: list[Action] = []
        for peer, msg in self.early.pop(mid, {}).values():
            if why:
                out += self._refuse(peer, msg, why)
            else:
                out.append(WriteChunk(peer, mid, msg.round, msg.seq, msg.image, msg.page,
                                      msg.data))
        held = self.held.pop(mid, None)
        if held is not None:
            peer, start = held
            out.append(CancelTimer(round_timer(mid, start.round, "prepared")))
            out += self._start_round(peer, start)
        return out

    def forget(self, mid: str) -> list[Action]:
        self.ready.pop(mid, None)
        self.newest.pop(mid, None)
        self.early.pop(mid, None)
        self._noted.pop(mid, None)
        held = self.held.pop(mid, None)
        return [] if held is None else [CancelTimer(round_timer(mid, held[1].round, "prepared"))]

    def _note(self, now: float, mid: str, round_: int, nbytes: int) -> list[Action]:
        last, pending = self._noted.get(mid, (-math.inf, 0))
        pending += nbytes
        if now - last < PROGRESS_EVERY:
            self._noted[mid] = (last, pending)
            return []
        self._noted[mid] = (now, 0)
        return [ToSession(mid, TransferProgress(round_, pending))]
