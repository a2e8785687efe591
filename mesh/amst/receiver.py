"""AMST, the adaptive multi-stream transport: sans-I/O sender and receiver cores.

A transfer moves chunks ``0, 1, 2, ...`` (opaque payloads, e.g. HDE's ~1 MiB
compressed page packs) from a sender to a receiver over N TCP streams, each its
own secure channel. The wire, per stream::

    sender   -> receiver   Open(transfer, stream)      first frame of every stream
    receiver -> sender     Ack(...)                    its current state: resume point
    sender   -> receiver   Chunk(id, digest, payload)  any number, any order
                   or      SealedChunk(id, payload)
    receiver -> sender     Ack(cumulative, spans, refused)   after every chunk
    sender   -> receiver   End(total)                  once every chunk is acknowledged

An Ack says: every chunk below ``cumulative`` arrived, and so did every chunk in
``spans`` (selective acknowledgement, like TCP SACK, RFC 2018); ``refused`` names
chunks whose SHA-256 digest did not match (re-requested, never delivered).

Every byte of a stream is authenticated by its channel's AEAD (secretstream,
XChaCha20-Poly1305; a tampered frame ends the stream and its chunks are re-sent on the
others), end to end between the two DCs even through a relay. A :class:`SealedChunk`
relies on that alone: no digest to compute at each end (2 x 0.7 ms of CPU per MiB on
the reference machine, more than the cipher). It is sent when both channel ends offer
:data:`mesh.versions.AMST_SEALED`; a :class:`Chunk` with its SHA-256 otherwise, which
every version reads. What the digest caught beyond the AEAD (a payload changed in the
sender's memory between hashing and sealing) HDE's root check after the round still
catches, end to end (DESIGN.md, HDE step 4).

The sender core (:mod:`mesh.amst.sender`) decides which chunk goes on which
stream, admits chunks only while the bytes admitted and not yet acknowledged stay
within its window (backpressure), re-sends a broken stream's unacknowledged chunks
on the others, never re-sends an acknowledged one, and adapts the stream count
(:mod:`mesh.amst.policy`). The receiver core delivers each valid chunk exactly
once. Neither touches a socket or a clock: drivers are :mod:`mesh.runtime.amst_transfer` (trio)
and the simulator.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right
from typing import Any

import attrs

from mesh import wire
from mesh.core import Notify, TimerFired
from mesh.wire import U64, Bytes, ListOf, Struct, field

__all__ = [
    "AmstError",
    "Open",
    "Chunk",
    "SealedChunk",
    "Ack",
    "End",
    "Span",
    "chunk_digest",
    "ChunkSet",
    "StreamUp",
    "StreamDown",
    "ChunkArrived",
    "EndArrived",
    "AckArrived",
    "Reply",
    "Deliver",
    "AmstReceiver",
    "MAX_CHUNK_BYTES",
    "check_ack",
]

#: Largest chunk payload: HDE packs ~1 MiB; 4 MiB leaves room for incompressible packs and
#: stays inside the channel's 8 MiB plaintext limit (mesh.channel.MAX_PLAINTEXT).
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: Selective-ack spans per Ack. TCP has room for 4 SACK blocks (RFC 2018); our Ack rides an
#: encrypted frame of its own, so 256 spans (4 KiB) describe any reordering a window of
#: 256+ chunks can produce, and a receiver with more reports the lowest ones.
MAX_SPANS = 256
#: Refused chunk ids per Ack: a receiver refuses at most the one chunk it just read.
MAX_REFUSED = 16
#: Gaps a receiver tolerates below its highest chunk. A sender has at most window / chunk
#: chunks out at once (64 MiB / 64 KiB = 1024 by default), so a peer leaving 65,536 gaps is
#: not a sender; the limit bounds the receiver's bookkeeping to about a megabyte.
MAX_HOLES = 65536
TRANSFER_ID_BYTES = 16
MAX_STREAMS = 1024
DIGEST_BYTES = 32  # SHA-256: cryptographic, and ~1.4 GB/s with SHA-NI on the reference machine


class AmstError(Exception):
    """A peer broke the AMST protocol, or a driver misused a core. The message names who."""


# --------------------------------------------------------------------------- wire


@wire.struct_type
class Span:
    start: int = field(U64())
    end: int = field(U64())


@wire.message("amst.open", max_size=128)
class Open:
    transfer: bytes = field(Bytes(TRANSFER_ID_BYTES, exact=True))
    stream: int = field(U64(MAX_STREAMS))


@wire.message("amst.chunk", max_size=MAX_CHUNK_BYTES + 256)
class Chunk:
    chunk: int = field(U64(2**63 - 1))
    digest: bytes = field(Bytes(DIGEST_BYTES, exact=True))
    payload: bytes = field(Bytes(MAX_CHUNK_BYTES))


@wire.message("amst.sealed", max_size=MAX_CHUNK_BYTES + 256)
class SealedChunk:
    """A chunk whose integrity is its channel's AEAD alone (see the module docstring)."""

    chunk: int = field(U64(2**63 - 1))
    payload: bytes = field(Bytes(MAX_CHUNK_BYTES))


@wire.message("amst.ack", max_size=16 * 1024)
class Ack:
    cumulative: int = field(U64(2**63))
    spans: tuple[Span, ...] = field(ListOf(Struct(Span), MAX_SPANS))
    refused: tuple[int, ...] = field(ListOf(U64(2**63 - 1), MAX_REFUSED))


@wire.message("amst.end", max_size=64)
class End:
    total: int = field(U64(2**63))


def chunk_digest(payload: bytes | memoryview) -> bytes:
    """The digest a Chunk carries; the receiver recomputes it before delivering."""
    return hashlib.sha256(payload).digest()


def check_ack(ack: Ack, who: str) -> None:
    """Spans must be sorted, disjoint, non-empty and above ``cumulative``."""
    floor = ack.cumulative
    for i, span in enumerate(ack.spans):
        if not floor < span.start < span.end:
            raise AmstError(
                f"{who}: ack spans[{i}] = [{span.start}, {span.end}) is not a non-empty span "
                f"above {floor} (cumulative {ack.cumulative})"
            )
        floor = span.end


# --------------------------------------------------------------------------- chunk sets


class ChunkSet:
    """A set of chunk ids: every id below ``floor``, plus sorted disjoint spans above it."""

    def __init__(self) -> None:
        self.floor = 0
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __contains__(self, chunk: int) -> bool:
        if chunk < self.floor:
            return True
        i = bisect_right(self._starts, chunk) - 1
        return i >= 0 and chunk < self._ends[i]

    def add(self, chunk: int) -> bool:
        """Add one id; False if it was already there."""
        if chunk in self:
            return False
        self.add_span(chunk, chunk + 1)
        return True

    def add_span(self, start: int, end: int) -> None:
        if end <= self.floor or start >= end:
            return
        start = max(start, self.floor)
        i = bisect_left(self._ends, start)  # first span touching or after start
        j = bisect_right(self._starts, end)  # spans starting at or before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        if self._starts[0] <= self.floor:
            self.floor = self._ends[0]
            del self._starts[0], self._ends[0]

    def add_ack(self, ack: Ack) -> None:
        self.add_span(0, ack.cumulative)
        for span in ack.spans:
            self.add_span(span.start, span.end)

    def spans(self, limit: int = MAX_SPANS) -> tuple[Span, ...]:
        pairs = zip(self._starts[:limit], self._ends[:limit], strict=True)
        return tuple(Span(s, e) for s, e in pairs)

    def span_count(self) -> int:
        return len(self._starts)

    def count(self) -> int:
        return self.floor + sum(e - s for s, e in zip(self._starts, self._ends, strict=True))


# --------------------------------------------------------------------------- events, actions


@attrs.frozen
class StreamUp:
    """Stream ``stream`` finished its handshake (and, at the sender, got the first Ack)."""

    stream: int


@attrs.frozen
class StreamDown:
    """Stream ``stream`` broke, failed to connect, or was closed."""

    stream: int


@attrs.frozen
class ChunkArrived:
    """A chunk frame arrived; ``valid`` says whether its digest matched (checked by the
    driver, off the event loop, with :func:`chunk_digest`; always true for a
    :class:`SealedChunk`, which the channel authenticated)."""

    stream: int
    message: Chunk | SealedChunk
    valid: bool


@attrs.frozen
class EndArrived:
    stream: int
    message: End


@attrs.frozen
class AckArrived:
    stream: int
    message: Ack


@attrs.frozen
class Reply:
    """Send ``message`` on stream ``stream``."""

    stream: int
    message: Any


@attrs.frozen
class Deliver:
    """Hand a verified chunk to the sink. Emitted exactly once per chunk id."""

    chunk: int
    payload: bytes


# --------------------------------------------------------------------------- receiver


class AmstReceiver:
    """The receiving end of one transfer. It outlives its streams: a cut transfer that
    reconnects is answered with the Ack of everything already received, so the sender
    resumes where it was."""

    def __init__(self, transfer: bytes) -> None:
        if len(transfer) != TRANSFER_ID_BYTES:
            raise ValueError(f"transfer id must be {TRANSFER_ID_BYTES} bytes")
        self.transfer = transfer
        self.received = ChunkSet()
        self.total: int | None = None
        self.delivered = 0
        self.delivered_bytes = 0
        self.refused = 0
        self.duplicates = 0

    @property
    def complete(self) -> bool:
        return self.total is not None and self.received.floor >= self.total

    def ack(self, refused: tuple[int, ...] = ()) -> Ack:
        return Ack(self.received.floor, self.received.spans(MAX_SPANS), refused)

    def handle(self, now: float, event: Any) -> list[Any]:
        if isinstance(event, StreamUp):
            return [Reply(event.stream, self.ack())]
        if isinstance(event, ChunkArrived):
            return self._on_chunk(event)
        if isinstance(event, EndArrived):
            return self._on_end(event)
        if isinstance(event, (StreamDown, TimerFired)):
            return []
        raise AmstError(f"receiver: unexpected event {type(event).__name__}")

    def _on_chunk(self, event: ChunkArrived) -> list[Any]:
        chunk = event.message.chunk
        if self.total is not None and chunk >= self.total:
            raise AmstError(f"stream {event.stream}: chunk {chunk} beyond the end ({self.total})")
        if chunk in self.received:
            self.duplicates += 1
            return [Reply(event.stream, self.ack())]
        if not event.valid:
            self.refused += 1
            return [
                Notify("amst.refused", {"stream": event.stream, "chunk": chunk}),
                Reply(event.stream, self.ack(refused=(chunk,))),
            ]
        opens_gap = chunk - 1 not in self.received and chunk + 1 not in self.received
        if opens_gap and self.received.span_count() >= MAX_HOLES:
            raise AmstError(
                f"stream {event.stream}: chunk {chunk} would leave more than {MAX_HOLES} gaps "
                "below it; no sender window allows that"
            )
        self.received.add(chunk)
        self.delivered += 1
        self.delivered_bytes += len(event.message.payload)
        return [Deliver(chunk, event.message.payload), Reply(event.stream, self.ack())]

    def _on_end(self, event: EndArrived) -> list[Any]:
        total = event.message.total
        if self.received.floor != total or self.received.spans(1):
            raise AmstError(
                f"stream {event.stream}: End({total}) but chunks received are "
                f"[0, {self.received.floor}) and {len(self.received.spans())} more spans"
            )
        first = self.total is None
        self.total = total
        return [Notify("amst.complete", {"chunks": total})] if first else []
