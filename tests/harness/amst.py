"""A sender core and a receiver core joined by modelled streams (no timing).

Every stream is two FIFO queues (a TCP connection). Tests choose what happens
next: a frame crosses, a write completes, a stream is cut, a frame is corrupted
or copied onto another stream. The harness checks, at every step, what AMST
promises: a chunk is delivered at most once and only intact, an acknowledged
chunk is never transmitted again, the window is never exceeded.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from mesh.amst.receiver import (
    Ack,
    AckArrived,
    AmstReceiver,
    Chunk,
    ChunkArrived,
    Deliver,
    End,
    EndArrived,
    Reply,
    StreamDown,
    StreamUp,
    chunk_digest,
)
from mesh.amst.sender import (
    Abort,
    AmstSender,
    ChunkOffered,
    ChunkWritten,
    CloseStream,
    Finish,
    OpenStream,
    Release,
    SourceDone,
    Transmit,
)
from mesh.core import CancelTimer, Notify, SetTimer, TimerFired

TRANSFER = bytes(range(16))


def payload_of(chunk: int) -> bytes:
    return chunk.to_bytes(8, "big") * 4


class Pair:
    def __init__(self, total: int, chunk_size: int = 600_000, window: int = 2 << 20) -> None:
        self.total = total
        self.chunk_size = chunk_size
        self.window = window
        self.receiver = AmstReceiver(TRANSFER)
        self.delivered: dict[int, bytes] = {}
        self.now = 0.0
        self.timers: dict[Any, float] = {}
        self.new_sender()

    def new_sender(self) -> None:
        """A fresh sender core (a restarted or resumed transfer)."""
        self.sender = AmstSender(TRANSFER, window_bytes=self.window)
        self.next_chunk = 0
        self.opening: list[int] = []  # OpenStream seen, not connected yet
        self.to_recv: dict[int, deque[tuple[Any, bool]]] = {}
        self.to_send: dict[int, deque[Ack]] = {}
        self.synced: set[int] = set()
        self.writing: dict[int, int] = {}
        self.finished: int | None = None
        self.aborted: str | None = None
        self.sent_frames: list[Chunk] = []
        self.timers = {}
        self.apply(self.sender.start(self.now))

    # ------------------------------------------------------------------ sender side

    def apply(self, actions: list[Any]) -> None:
        assert 0 <= self.sender.in_flight <= self.sender.window
        for a in actions:
            if isinstance(a, OpenStream):
                self.opening.append(a.stream)
            elif isinstance(a, Transmit):
                assert a.chunk not in self.sender.acked, f"acknowledged chunk {a.chunk} re-sent"
                assert a.stream not in self.writing
                msg = Chunk(a.chunk, chunk_digest(payload_of(a.chunk)), payload_of(a.chunk))
                self.to_recv[a.stream].append((msg, True))
                self.writing[a.stream] = a.chunk
                self.sent_frames.append(msg)
            elif isinstance(a, CloseStream):
                self.drop_stream(a.stream, tell_sender=False)
            elif isinstance(a, Finish):
                self.finished = a.total
                for s in self.to_recv:
                    self.to_recv[s].append((End(a.total), True))
            elif isinstance(a, Abort):
                self.aborted = a.reason
            elif isinstance(a, SetTimer):
                self.timers[a.key] = a.at
            elif isinstance(a, CancelTimer):
                self.timers.pop(a.key, None)
            else:
                assert isinstance(a, (Release, Notify)), a

    def feed(self, event: Any) -> None:
        self.apply(self.sender.handle(self.now, event))

    def offer(self) -> bool:
        """Offer the next chunk if the window has room; False if it does not or none left."""
        if self.next_chunk >= self.total:
            if self.sender.room() > 0:
                self.feed(SourceDone())
            return False
        if self.sender.room() < self.chunk_size:
            return False
        c = self.next_chunk
        self.next_chunk += 1
        self.feed(ChunkOffered(c, self.chunk_size))
        return True

    def connect(self, s: int) -> None:
        self.opening.remove(s)
        self.to_recv[s] = deque()
        self.to_send[s] = deque()
        self.receive_actions(s, self.receiver.handle(self.now, StreamUp(s)))

    def fail_connect(self, s: int) -> None:
        self.opening.remove(s)
        self.feed(StreamDown(s))

    def complete_write(self, s: int) -> None:
        c = self.writing.pop(s)
        self.feed(ChunkWritten(s, c))

    def to_sender(self, s: int) -> None:
        ack = self.to_send[s].popleft()
        if s not in self.synced:
            self.synced.add(s)
            self.feed(StreamUp(s))
        self.feed(AckArrived(s, ack))

    # ------------------------------------------------------------------ receiver side

    def to_receiver(self, s: int) -> None:
        msg, valid = self.to_recv[s].popleft()
        if isinstance(msg, End):
            event: Any = EndArrived(s, msg)
        else:
            event = ChunkArrived(s, msg, valid and chunk_digest(msg.payload) == msg.digest)
        self.receive_actions(s, self.receiver.handle(self.now, event))

    def receive_actions(self, s: int, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Deliver):
                assert a.chunk not in self.delivered, f"chunk {a.chunk} delivered twice"
                assert a.payload == payload_of(a.chunk), f"chunk {a.chunk} delivered corrupted"
                self.delivered[a.chunk] = a.payload
            elif isinstance(a, Reply):
                assert a.stream == s
                if s in self.to_send:
                    self.to_send[s].append(a.message)
            else:
                assert isinstance(a, Notify), a

    # ------------------------------------------------------------------ faults

    def drop_stream(self, s: int, *, tell_sender: bool = True) -> None:
        """The connection is gone: frames in flight are lost in both directions."""
        self.to_recv.pop(s, None)
        self.to_send.pop(s, None)
        self.synced.discard(s)
        self.writing.pop(s, None)
        self.receiver.handle(self.now, StreamDown(s))
        if tell_sender:
            self.feed(StreamDown(s))

    def corrupt_next(self, s: int) -> None:
        msg, _ = self.to_recv[s][0]
        if isinstance(msg, Chunk):
            bad = bytes([msg.payload[0] ^ 0x55]) + msg.payload[1:]
            self.to_recv[s][0] = (Chunk(msg.chunk, msg.digest, bad), True)

    def fire_due_timers(self) -> None:
        for key, at in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if at <= self.now and self.timers.get(key) == at:
                del self.timers[key]
                self.feed(TimerFired(key))

    # ------------------------------------------------------------------ driving to the end

    def live(self) -> list[int]:
        return sorted(self.to_recv)

    def run_quietly(self, max_steps: int = 100_000) -> None:
        """No more faults: let everything flow until the sender finishes or aborts."""
        for _ in range(max_steps):
            if self.finished is not None or self.aborted is not None:
                for s in self.live():
                    while self.to_recv[s]:
                        self.to_receiver(s)
                return
            progressed = False
            while self.offer():
                progressed = True
            for s in list(self.opening):
                self.connect(s)
                progressed = True
            for s in self.live():
                if s in self.writing:
                    self.complete_write(s)
                    progressed = True
                if s in self.to_recv and self.to_recv[s]:
                    self.to_receiver(s)
                    progressed = True
                if s in self.to_send and self.to_send[s]:
                    self.to_sender(s)
                    progressed = True
            if not progressed:
                self.now = min(self.timers.values(), default=self.now + 1.0)
                self.fire_due_timers()
        raise AssertionError("transfer did not finish")
