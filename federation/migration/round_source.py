"""The source side of the rounds core: one object per round this DC sends.

:class:`V1Sending` is the v1 window/ack protocol. The round's pages are planned (a new
dirty generation, then every page or the pages dirtied since the previous round
began), cut into :class:`~federation.migration.round_messages.PagesChunk` runs of at
most ``CHUNK_PAGES`` and sent with at most ``WINDOW`` chunks read or unacknowledged.
Acknowledgements may come late, twice or out of order: each names its chunk, and only
the first counts. A chunk whose acknowledgement is missing is sent again when a new
link to the target comes up and after ``RESEND_AFTER`` without any acknowledgement (the
target writes pages as absolute content, so a chunk written twice is written once);
``ACK_TIMEOUT`` without one, or a chunk the target refused, fails the round.

:class:`V3Sending` is the round control of v3 (HDE over AMST): the shadow images are
refreshed (a new dirty generation), :class:`V3Round` announces the round, the target
must answer :class:`V3Status` within ``ACK_TIMEOUT``; then the data plane moves the
diff and the chunks and reports what moved. A cut data path does not end the round:
the data plane reports it and waits, and the round resumes the transfer after a
backoff; it fails only when the path stays cut past the resume budget, or when
``RESUMES`` resumes in a row bring nothing through, or when nothing moves for
``ACK_TIMEOUT``.

Either ends by counting the pages written while it ran (what the next round sends)
and reports :class:`~federation.migration.vocabulary.RoundSent`.
"""

from __future__ import annotations

import abc
from typing import Any

from federation.migration.round_events import (
    ChunkRead,
    CloseRound,
    CountDirty,
    DirtyCounted,
    PlanRound,
    ReadChunk,
    RoundIoFailed,
    RoundPlanned,
    ToSession,
    V3Cancel,
    V3Cut,
    V3Failed,
    V3Moved,
    V3Prepare,
    V3Prepared,
    V3Preparing,
    V3Resume,
    V3Transfer,
    V3Verified,
)
from federation.migration.round_messages import (
    ACK_TIMEOUT,
    RESEND_AFTER,
    WINDOW,
    PagesAck,
    PagesChunk,
    V3Preparation,
    V3Round,
    V3Status,
    runs,
    transfer_id,
)
from federation.migration.vocabulary import RoundSent, SendRound, TransferProgress
from mesh import wire
from mesh.amst.sender import BACKOFF_MAX_S, BACKOFF_MIN_S
from mesh.core import CancelTimer, Send, SetTimer
from mesh.hde.image import PAGE_SIZE

__all__ = ["Sending", "V1Sending", "V3Sending", "RESUME_BUDGET_S", "RESUMES",
           "PROGRESS_EVERY", "round_timer"]

#: How long a v3 round's data path may stay cut (no chunk acknowledged) before the round
#: fails: half the sessions' stall timer (vocabulary.STALL_TIMEOUT, 30 s). The target's
#: session hears of no chunk meanwhile, so the source gives up — and aborts with the
#: reason — well before the target's stall timer would abort on its own.
RESUME_BUDGET_S = 15.0
#: Resumes in a row that bring no chunk through before the round fails. Their waits double
#: from AMST's reconnect backoff (mesh.amst.sender: 0.2 s, RFC 6298 doubling, at most 5 s),
#: so 8 resumes span about 21 s of waiting: the time budget, not the count, normally ends
#: a long cut; the count bounds the attempts when every attempt fails at once.
RESUMES = 8
#: A session hears of a round's progress at most this often: far inside its stall timer
#: (30 s), rare enough to cost nothing next to the data, and twice as often as an
#: operator's display must move (issue 16: at least once a second, in every round).
PROGRESS_EVERY = 0.5

Action = Any


def round_timer(migration_id: str, round_: int, what: str) -> tuple[str, str, int, str]:
    """The key of a rounds-core timer (its own, apart from the sessions' "migration")."""
    return ("rounds", migration_id, round_, what)


class Sending(abc.ABC):
    """One round of one migration, sent from here to ``target``. It is over once
    ``sent`` (delivered) or ``error`` (failed) is set."""

    version: int
    timers: tuple[str, ...]

    def __init__(self, action: SendRound, target: str, now: float, since: int | None) -> None:
        self.action = action
        self.target = target
        self.started = now
        #: the dirty generation of the previous round (None: send every page)
        self.since = since
        self.mark: int | None = None
        self.sent: RoundSent | None = None
        self.error = ""
        #: the data plane's figures of the round, for the host's log
        self.figures: dict[str, Any] = {}
        self._reported = now

    @property
    def migration_id(self) -> str:
        return self.action.migration_id

    @property
    def round(self) -> int:
        return self.action.round

    @property
    def done(self) -> bool:
        return self.sent is not None or bool(self.error)

    def timer(self, what: str, at: float) -> SetTimer:
        return SetTimer(round_timer(self.migration_id, self.round, what), at)

    def cancel_timers(self) -> list[Action]:
        return [CancelTimer(round_timer(self.migration_id, self.round, w)) for w in self.timers]

    def fail(self, reason: str) -> list[Action]:
        if not self.done:
            self.error = reason
        return []

    def progress(self, nbytes: int, pages: int = 0, wire_bytes: int = 0) -> ToSession:
        return ToSession(self.migration_id, TransferProgress(self.round, nbytes, pages,
                                                             wire_bytes))

    def progress_due(self, now: float, nbytes: int) -> list[Action]:
        """Progress for the session (v1: page bytes, as on the wire), if the last report is
        PROGRESS_EVERY old."""
        if now - self._reported < PROGRESS_EVERY:
            return []
        self._reported = now
        return [self.progress(nbytes, nbytes // PAGE_SIZE, nbytes)]

    def delivered(self, now: float, pages: int, nbytes: int, wire_bytes: int,
                  dirty: int, move_seconds: float | None = None) -> list[Action]:
        self.sent = RoundSent(self.round, pages, nbytes, wire_bytes, now - self.started, dirty,
                              move_seconds)
        return self.cancel_timers()

    @abc.abstractmethod
    def start(self, now: float) -> list[Action]:
        """The first actions of the round."""

    @abc.abstractmethod
    def handle(self, now: float, event: object) -> list[Action]:
        """A reply or report about this round (its migration and round number match)."""

    @abc.abstractmethod
    def on_message(self, now: float, msg: Any) -> list[Action]:
        """A round message from the target about this round."""

    @abc.abstractmethod
    def on_timer(self, now: float, what: str) -> list[Action]: ...

    @abc.abstractmethod
    def on_peer_up(self, now: float) -> list[Action]:
        """A new control link to the target: what the old one lost is lost."""

    @abc.abstractmethod
    def stop(self) -> list[Action]:
        """The round is cancelled or failed: what releases its resources."""


class V1Sending(Sending):
    version = 1
    timers = ("ack", "resend")

    def __init__(self, action: SendRound, target: str, now: float, since: int | None) -> None:
        super().__init__(action, target, now, since)
        #: (image, first page, pages) of every chunk, by sequence number
        self.plan: list[tuple[str, int, int]] = []
        self.planned = False
        self.next = 0
        self.reading: set[int] = set()
        self.unacked: dict[int, PagesChunk] = {}
        self.pages = 0
        self.acked_bytes = 0
        self.wire_bytes = 0
        self.counting = False

    def start(self, now: float) -> list[Action]:
        a = self.action
        return [PlanRound(a.migration_id, a.vm, a.round, self.since)]

    def handle(self, now: float, event: object) -> list[Action]:
        if isinstance(event, RoundPlanned) and not self.planned:
            self.planned = True
            self.mark = event.mark
            self.plan = [(image, first, count) for image, pages in event.pages
                         for first, count in runs(pages)]
            self.pages = sum(count for _, _, count in self.plan)
            if not self.plan:
                return self._count()
            return [*self._read_more(), self.timer("ack", now + ACK_TIMEOUT),
                    self.timer("resend", now + RESEND_AFTER)]
        if isinstance(event, ChunkRead) and event.seq in self.reading:
            self.reading.discard(event.seq)
            image, first, count = self.plan[event.seq]
            if len(event.data) != count * PAGE_SIZE:
                return self.fail(f"read {len(event.data)} bytes of {image} pages "
                                 f"{first}..{first + count}, expected {count * PAGE_SIZE}")
            msg = PagesChunk(self.migration_id, self.round, event.seq, image, first, event.data)
            self.unacked[event.seq] = msg
            return self._send([msg])
        if isinstance(event, DirtyCounted) and self.counting:
            return self.delivered(now, self.pages, self.pages * PAGE_SIZE, self.wire_bytes,
                                  event.pages)
        if isinstance(event, RoundIoFailed):
            return self.fail(event.reason)
        return []

    def on_message(self, now: float, msg: Any) -> list[Action]:
        if not isinstance(msg, PagesAck):
            return []
        if msg.error:
            return self.fail(f"{self.target} refused a chunk: {msg.error}")
        chunk = self.unacked.pop(msg.seq, None)
        if chunk is None:
            return []  # a duplicate, or an acknowledgement of a chunk sent twice
        self.acked_bytes += len(chunk.data)
        out: list[Action] = [self.timer("ack", now + ACK_TIMEOUT),
                             self.timer("resend", now + RESEND_AFTER), *self._read_more()]
        if self.next == len(self.plan) and not self.reading and not self.unacked:
            return out + self._count()
        return out + self.progress_due(now, self.acked_bytes)

    def on_timer(self, now: float, what: str) -> list[Action]:
        if what == "ack":
            return self.fail(f"no acknowledgement from {self.target} in {ACK_TIMEOUT:.0f} s")
        if what == "resend" and not self.counting:
            return [*self._send(list(self.unacked.values())),
                    self.timer("resend", now + RESEND_AFTER)]
        return []

    def on_peer_up(self, now: float) -> list[Action]:
        if self.counting or not self.unacked:
            return []
        return [*self._send(list(self.unacked.values())), self.timer("resend", now + RESEND_AFTER)]

    def stop(self) -> list[Action]:
        return [*self.cancel_timers(), CloseRound(self.migration_id)]

    def _send(self, chunks: list[PagesChunk]) -> list[Action]:
        for msg in chunks:
            self.wire_bytes += len(wire.encode(msg))
        return [Send(self.target, msg) for msg in chunks]

    def _read_more(self) -> list[Action]:
        out: list[Action] = []
        while self.next < len(self.plan) and len(self.reading) + len(self.unacked) < WINDOW:
            seq = self.next
            self.next += 1
            self.reading.add(seq)
            image, first, count = self.plan[seq]
            out.append(ReadChunk(self.migration_id, self.round, seq, image, first, count))
        return out

    def _count(self) -> list[Action]:
        assert self.mark is not None, "the round is counted after it was planned"
        self.counting = True
        a = self.action
        return [*self.cancel_timers(), CountDirty(a.migration_id, a.vm, a.round, self.mark)]


class V3Sending(Sending):
    version = 3
    timers = ("ready", "quiet", "resume")

    def __init__(self, action: SendRound, target: str, now: float, since: int | None,
                 resume_budget: float = RESUME_BUDGET_S) -> None:
        super().__init__(action, target, now, since)
        self.resume_budget = resume_budget
        #: preparing -> ready (V3Round sent) -> moving -> counting
        self.phase = "preparing"
        self.covered = 0
        self.control_bytes = 0
        self.wire_bytes = 0
        self.resumes = 0
        self._cut_since: float | None = None
        self._delay = BACKOFF_MIN_S
        self._in_a_row = 0

    def start(self, now: float) -> list[Action]:
        a = self.action
        return [V3Prepare(a.migration_id, a.vm, a.round, self.target, self.since)]

    def handle(self, now: float, event: object) -> list[Action]:
        if isinstance(event, V3Prepared) and self.phase == "preparing":
            self.mark, self.covered, self.phase = event.mark, event.covered, "ready"
            msg = V3Round(self.migration_id, self.round,
                          transfer_id(self.migration_id, self.round), event.images)
            self.control_bytes += len(wire.encode(msg))
            return [Send(self.target, msg), self.timer("ready", now + ACK_TIMEOUT)]
        if isinstance(event, V3Preparing) and self.phase in ("preparing", "ready", "moving"):
            # progress for both sessions: the target hears nothing else before the round.
            # A migration's first round is announced before its copy of all RAM, so the
            # copy (and its dirty sample) goes on while the target gets ready and after
            # its word (federation.dataplane.v3_source): progress then too
            quiet = [self.timer("quiet", now + ACK_TIMEOUT)] if self.phase == "moving" else []
            return [*quiet, ToSession(self.migration_id, TransferProgress(
                        self.round, 0, 0, 0, event.pages, event.dirtied, event.dirty_seconds,
                        event.preparation_s)),
                    Send(self.target, V3Preparation(self.migration_id, self.round,
                                                    event.pages))]
        if isinstance(event, V3Moved) and self.phase == "moving":
            out: list[Action] = [self.timer("quiet", now + ACK_TIMEOUT)] if event.moved else []
            return [*out, self.progress(event.pages * PAGE_SIZE, event.pages,
                                        event.frame_bytes)]
        if isinstance(event, V3Cut) and self.phase == "moving":
            return self._on_cut(now, event)
        if isinstance(event, V3Verified) and self.phase == "moving":
            self.phase = "counting"
            # the data plane counted the diff both ways; the round's start is ours
            self.wire_bytes = event.wire_bytes + self.control_bytes
            control = int(event.figures.get("control_bytes", 0)) + self.control_bytes
            self.figures = {**event.figures, "control_bytes": control, "resumes": self.resumes}
            assert self.mark is not None, "V3Prepared came first"
            a = self.action
            return [*self.cancel_timers(), CountDirty(a.migration_id, a.vm, a.round, self.mark)]
        if isinstance(event, DirtyCounted) and self.phase == "counting":
            move = self.figures.get("transfer_s")
            return self.delivered(now, self.covered, self.covered * PAGE_SIZE, self.wire_bytes,
                                  event.pages, float(move) if move is not None else None)
        if isinstance(event, (V3Failed, RoundIoFailed)):
            return self.fail(event.reason)
        return []

    def on_message(self, now: float, msg: Any) -> list[Action]:
        if not isinstance(msg, V3Status):
            return []
        if self.phase == "ready":
            if msg.error:
                return self.fail(f"{self.target} refused round {self.round}: {msg.error}")
            self.phase = "moving"
            a = self.action
            return [CancelTimer(round_timer(a.migration_id, a.round, "ready")),
                    V3Transfer(a.migration_id, a.round), self.timer("quiet", now + ACK_TIMEOUT)]
        if self.phase == "moving" and msg.error:
            return self.fail(f"{self.target}: {msg.error}")
        return []

    def on_timer(self, now: float, what: str) -> list[Action]:
        if what == "ready" and self.phase == "ready":
            return self.fail(f"{self.target} did not get ready for round {self.round} in "
                             f"{ACK_TIMEOUT:.0f} s")
        if what == "quiet" and self.phase == "moving":
            return self.fail(f"round {self.round}: no progress with {self.target} in "
                             f"{ACK_TIMEOUT:.0f} s")
        if what == "resume" and self.phase == "moving":
            self.resumes += 1
            return [V3Resume(self.migration_id, self.round)]
        return []

    def on_peer_up(self, now: float) -> list[Action]:
        return []  # the data streams are not the control link; AMST re-opens its own

    def stop(self) -> list[Action]:
        return [*self.cancel_timers(), V3Cancel(self.migration_id)]

    def _on_cut(self, now: float, cut: V3Cut) -> list[Action]:
        if self._cut_since is None or cut.acked_bytes > 0:  # chunks got through: a new cut
            self._cut_since, self._delay, self._in_a_row = now, BACKOFF_MIN_S, 0
        self._in_a_row += 1
        cut_for = now - self._cut_since
        if cut_for >= self.resume_budget or self._in_a_row > RESUMES:
            return self.fail(f"AMST to {self.target} cut for {cut_for:.1f} s "
                             f"({self._in_a_row - 1} resumes): {cut.reason}")
        wait = min(self._delay, max(0.0, self._cut_since + self.resume_budget - now))
        self._delay = min(BACKOFF_MAX_S, 2 * self._delay)
        return [self.timer("resume", now + wait)]

