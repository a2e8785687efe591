"""The sending end of an AMST transfer: a sans-I/O core (see :mod:`mesh.amst.receiver`).

Every admitted chunk is in exactly one place: waiting for a stream (the re-send
queue first, then the fresh queue), or on one stream (being written, or written
and not yet acknowledged). Acknowledged chunks are released and never sent again.
The bytes admitted and not yet acknowledged never exceed ``window_bytes``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

from mesh.amst import receiver as amst
from mesh.amst.policy import (
    CHUNK_MAX,
    MODES,
    STREAM_BOUNDS,
    StreamBounds,
    StreamController,
    chunk_bytes_for_loss,
    streams_for_bdp,
)
from mesh.amst.receiver import (
    TRANSFER_ID_BYTES,
    Ack,
    AckArrived,
    AmstError,
    ChunkSet,
    StreamDown,
    StreamUp,
    check_ack,
)
from mesh.core import CancelTimer, Notify, SetTimer, TimerFired
from mesh.links.modes import Mode

__all__ = [
    "AmstSender",
    "ChunkOffered",
    "SourceDone",
    "ChunkWritten",
    "LinkObserved",
    "OpenStream",
    "CloseStream",
    "Transmit",
    "Release",
    "Finish",
    "Abort",
    "DEFAULT_WINDOW_BYTES",
]

#: Bytes admitted and not yet acknowledged. 64 MiB is 2x the BDP of 2.5 Gbit/s x 100 ms and
#: 6 % of the 1 GiB reference guest; a node running several transfers sets its own.
DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024
#: Adaptation interval: at least 0.5 s (at 1 GB/s that is ~500 chunks, so one interval's
#: throughput is measured to within a few %), and 10 smoothed RTTs so a new stream has left
#: TCP slow start (~log2(window/IW10) RTTs) before it is judged.
MIN_INTERVAL_S = 0.5
RTTS_PER_INTERVAL = 10
#: Throughput is counted in acknowledged chunks, so an interval edge can cut up to one chunk
#: per stream short; with at least 64 chunks per judged interval that error stays under 8 %
#: for up to 8 busy streams on average (N/2 chunks), below the controller's 10 % GAIN.
MIN_CHUNKS_PER_INTERVAL = 64
#: A stream with unacknowledged chunks and no progress for this long is declared broken.
#: Linux gives up on a dead peer only after ~15 min (tcp_retries2=15); a 1 MiB chunk at the
#: slowest supported link (1 Mbit/s) takes 8.4 s, so 30 s is no progress, not a slow link.
STALL_S = 30.0
#: Reconnect backoff: Linux's minimum RTO (TCP_RTO_MIN, 200 ms) doubled per failure
#: (RFC 6298 §5.5) up to 5 s; after this many failures in a row without an ack while no
#: stream is up, the transfer is cut (the caller may resume it later).
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
MAX_FAILURES = 6
#: A chunk refused this many times (digest mismatch) is not a transit error but a fault.
MAX_REFUSALS = 8


# --------------------------------------------------------------------------- events


@attrs.frozen
class ChunkOffered:
    """The driver holds chunk ``chunk`` of ``size`` bytes, ready to send."""

    chunk: int
    size: int


@attrs.frozen
class SourceDone:
    """No more chunks will be offered."""


@attrs.frozen
class ChunkWritten:
    """The driver finished writing ``chunk`` to ``stream``."""

    stream: int
    chunk: int


@attrs.frozen
class LinkObserved:
    """A link estimate from the control plane (RTT s, bandwidth bytes/s, loss fraction)."""

    rtt: float
    bandwidth: float
    loss: float


# --------------------------------------------------------------------------- actions


@attrs.frozen
class OpenStream:
    stream: int


@attrs.frozen
class CloseStream:
    """Close ``stream`` cleanly: nothing of it is unacknowledged."""

    stream: int


@attrs.frozen
class Transmit:
    stream: int
    chunk: int


@attrs.frozen
class Release:
    """``chunk`` is acknowledged (or was before it was offered): drop its payload."""

    chunk: int


@attrs.frozen
class Finish:
    """Every chunk is acknowledged: send End(total) on the open streams and close them."""

    total: int


@attrs.frozen
class Abort:
    reason: str


_OPENING, _UP, _DRAINING = "opening", "up", "draining"
_ADAPT = ("amst", "adapt")
_REOPEN = ("amst", "reopen")


class _Stream:
    def __init__(self, now: float) -> None:
        self.state = _OPENING
        self.chunks: dict[int, None] = {}  # on this stream, in send order
        self.writing: int | None = None
        self.sent_at: dict[int, float] = {}
        self.progress = now


class AmstSender:
    """Schedules one transfer's chunks over its streams. Drive it with :meth:`start`, then
    :meth:`handle`; ask :meth:`room` before offering a chunk."""

    def __init__(
        self,
        transfer: bytes,
        *,
        mode: str | Mode = "datacenter",
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        bounds: StreamBounds | None = None,
        max_failures: int = MAX_FAILURES,
    ) -> None:
        if len(transfer) != TRANSFER_ID_BYTES:
            raise ValueError(f"transfer id must be {TRANSFER_ID_BYTES} bytes")
        mode = mode.value if isinstance(mode, Mode) else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if window_bytes < 2 * CHUNK_MAX:
            # a driver reserves a little over one chunk while it prepares the next
            raise ValueError(f"window_bytes {window_bytes} is below two chunks ({CHUNK_MAX})")
        self.transfer = transfer
        self.mode = mode
        self.max_failures = max_failures
        self.window = window_bytes
        self.bounds = bounds or STREAM_BOUNDS[mode]
        self.controller = StreamController(self.bounds, self.bounds.initial)
        self.chunk_bytes = CHUNK_MAX
        self.acked = ChunkSet()
        self.in_flight = 0
        self.max_in_flight = 0
        self._size: dict[int, int] = {}  # admitted, not acknowledged
        self._on: dict[int, int | None] = {}  # chunk -> stream, None while queued
        self._fresh: deque[int] = deque()
        self._resend: deque[int] = deque()
        self._streams: dict[int, _Stream] = {}
        self._next_stream = 0
        self._synced = False
        self._source_done = False
        self._highest = -1
        self._failures = 0
        self._reopen_pending = False
        self._refusals: dict[int, int] = {}
        self._done = False
        self._srtt: float | None = None
        self._min_rtt: float | None = None  # BBR's min_rtt filter: the path, not the queue
        self._interval_start = 0.0
        self._interval_bytes = 0
        self._interval_chunks = 0
        self._interval_busy = True
        self._settling = True
        # figures
        self.sends: dict[int, int] = {}  # chunk -> times transmitted
        self.acked_bytes = 0
        #: payload bytes of the chunks written whole to a stream (every copy): what the
        #: sockets took, so what the link drains once their buffers are full
        self.written_bytes = 0
        self.refused = 0
        self.resent = 0
        self.streams_opened = 0
        self.max_streams_up = 0

    # ------------------------------------------------------------------ queries

    @property
    def done(self) -> bool:
        return self._done

    def room(self) -> int:
        """Bytes that may still be admitted (0 until the receiver's first Ack)."""
        if not self._synced or self._done or self._source_done:
            return 0
        return self.window - self.in_flight

    def live_streams(self) -> list[int]:
        return [s for s, st in self._streams.items() if st.state != _DRAINING]

    def up_streams(self) -> list[int]:
        return [s for s, st in self._streams.items() if st.state == _UP]

    # ------------------------------------------------------------------ driving

    def start(self, now: float) -> list[Any]:
        self._new_interval(now)
        out: list[Any] = [SetTimer(_ADAPT, now + MIN_INTERVAL_S)]
        for _ in range(self.controller.target):
            out.append(self._open(now))
        return out

    def handle(self, now: float, event: Any) -> list[Any]:
        if self._done:
            return []
        out: list[Any] = []
        if isinstance(event, AckArrived):
            self._on_ack(now, event.stream, event.message, out)
        elif isinstance(event, ChunkWritten):
            self._on_written(now, event, out)
        elif isinstance(event, ChunkOffered):
            self._on_offer(event, out)
        elif isinstance(event, StreamUp):
            st = self._streams.get(event.stream)
            if st is None or st.state != _OPENING:
                raise AmstError(f"stream {event.stream}: up, but it was not being opened")
            st.state = _UP
            st.progress = now
            self.max_streams_up = max(self.max_streams_up, len(self.up_streams()))
        elif isinstance(event, StreamDown):
            self._on_down(now, event.stream, out)
        elif isinstance(event, SourceDone):
            self._source_done = True
        elif isinstance(event, LinkObserved):
            self._on_link(now, event, out)
        elif isinstance(event, TimerFired):
            if event.key == _ADAPT:
                self._adapt(now, out)
            elif event.key == _REOPEN:
                self._reopen_pending = False
                self._refill(now, out, backoff_over=True)
        else:
            raise AmstError(f"sender: unexpected event {type(event).__name__}")
        if not self._done:
            self._pump(out)
            self._check_finished(out)
        assert 0 <= self.in_flight <= self.window, (self.in_flight, self.window)
        return out

    # ------------------------------------------------------------------ events

    def _on_offer(self, event: ChunkOffered, out: list[Any]) -> None:
        c = event.chunk
        if c in self.acked:
            out.append(Release(c))
            return
        if c in self._size:
            raise AmstError(f"chunk {c} offered twice")
        if event.size <= 0 or event.size > self.window - self.in_flight:
            raise AmstError(
                f"chunk {c} of {event.size} bytes does not fit the window "
                f"({self.in_flight} of {self.window} bytes in flight)"
            )
        self._size[c] = event.size
        self._on[c] = None
        self._fresh.append(c)
        self.in_flight += event.size
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._highest = max(self._highest, c)

    def _on_written(self, now: float, event: ChunkWritten, out: list[Any]) -> None:
        st = self._streams.get(event.stream)
        if st is None or st.writing != event.chunk:
            return  # the stream broke meanwhile; its chunks were already re-queued
        st.writing = None
        st.progress = now
        self.written_bytes += self._size.get(event.chunk, 0)
        if self._on.get(event.chunk) == event.stream:
            st.sent_at[event.chunk] = now

    def _on_ack(self, now: float, stream: int, ack: Ack, out: list[Any]) -> None:
        check_ack(ack, f"stream {stream}")
        st = self._streams.get(stream)  # None: a late frame of a stream given up (still true)
        if st is not None:
            st.progress = now
        self._failures = 0
        self._synced = True
        self.acked.add_ack(ack)
        if self.acked.span_count() > amst.MAX_HOLES:  # the transfer fails on this error
            raise AmstError(f"stream {stream}: acks leave more than {amst.MAX_HOLES} gaps")
        for c in [c for c in self._size if c in self.acked]:
            self._release(now, c, out)
        for c in ack.refused:
            if self._on.get(c) != stream:
                continue  # already re-queued, or acknowledged through another copy
            self.refused += 1
            self._refusals[c] = self._refusals.get(c, 0) + 1
            if self._refusals[c] >= MAX_REFUSALS:
                self._abort(f"chunk {c} refused {MAX_REFUSALS} times: not a transit error", out)
                return
            assert st is not None  # _on[c] == stream, so the stream is still known
            st.chunks.pop(c, None)
            st.sent_at.pop(c, None)
            self._on[c] = None
            self._resend.appendleft(c)
            out.append(Notify("amst.refused", {"stream": stream, "chunk": c}))
        if st is not None and st.state == _DRAINING and not st.chunks and st.writing is None:
            del self._streams[stream]
            out.append(CloseStream(stream))

    def _release(self, now: float, c: int, out: list[Any]) -> None:
        size = self._size.pop(c)
        where = self._on.pop(c)
        self.in_flight -= size
        self.acked_bytes += size
        self._interval_bytes += size
        self._interval_chunks += 1
        if where is not None:
            st = self._streams[where]
            st.chunks.pop(c, None)
            sent = st.sent_at.pop(c, None)
            if sent is not None:
                sample = now - sent
                # RFC 6298 §2.3 smoothing (alpha = 1/8)
                self._srtt = sample if self._srtt is None else 0.875 * self._srtt + 0.125 * sample
                self._min_rtt = sample if self._min_rtt is None else min(self._min_rtt, sample)
        out.append(Release(c))

    def _on_down(self, now: float, stream: int, out: list[Any]) -> None:
        st = self._streams.pop(stream, None)
        if st is None:
            return
        orphans = [c for c in st.chunks if self._on.get(c) == stream]
        for c in orphans:
            self._on[c] = None
            self.resent += 1
        self._resend.extendleft(reversed(orphans))
        self._failures += 1
        out.append(Notify("amst.stream_down", {"stream": stream, "requeued": len(orphans)}))
        if not self.up_streams() and self._failures >= self.max_failures:
            self._abort(f"transfer cut: {self._failures} stream failures in a row", out)
            return
        self._refill(now, out)

    def _on_link(self, now: float, event: LinkObserved, out: list[Any]) -> None:
        self.chunk_bytes = chunk_bytes_for_loss(event.loss)
        self.controller.raise_to(streams_for_bdp(event.rtt * event.bandwidth, self.bounds))
        self._refill(now, out)

    # ------------------------------------------------------------------ scheduling

    def _open(self, now: float) -> OpenStream:
        s = self._next_stream
        self._next_stream += 1
        self._streams[s] = _Stream(now)
        self.streams_opened += 1
        return OpenStream(s)

    def _refill(self, now: float, out: list[Any], backoff_over: bool = False) -> None:
        """Open or drain streams toward the controller's target."""
        live = self.live_streams()
        if len(live) < self.controller.target:
            if self._failures and not self.up_streams() and not backoff_over:
                if not self._reopen_pending:  # nothing works: back off before retrying
                    delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (self._failures - 1))
                    self._reopen_pending = True
                    out.append(SetTimer(_REOPEN, now + delay))
                return
            for _ in range(self.controller.target - len(live)):
                out.append(self._open(now))
            self._settling = True
        elif len(live) > self.controller.target:
            for s in sorted(live, reverse=True)[: len(live) - self.controller.target]:
                st = self._streams[s]
                if st.state == _OPENING:
                    continue  # let it come up; it is drained on a later interval
                st.state = _DRAINING
                self._settling = True
                if not st.chunks and st.writing is None:
                    del self._streams[s]
                    out.append(CloseStream(s))

    def _pump(self, out: list[Any]) -> None:
        for s, st in self._streams.items():
            if st.state != _UP or st.writing is not None:
                continue
            c = self._next_queued()
            if c is None:
                return
            self._on[c] = s
            st.chunks[c] = None
            st.writing = c
            self.sends[c] = self.sends.get(c, 0) + 1
            out.append(Transmit(s, c))

    def _next_queued(self) -> int | None:
        for queue in (self._resend, self._fresh):
            while queue:
                c = queue.popleft()
                if c in self._size and self._on[c] is None:
                    return c
        return None

    def _check_finished(self, out: list[Any]) -> None:
        if self._source_done and self._synced and not self._size:
            if self.acked.floor <= self._highest or self.acked.spans(1):
                raise AmstError(
                    f"source done, but chunks below {self._highest + 1} were never offered "
                    f"or the receiver holds chunks beyond {self.acked.floor}"
                )
            self._done = True
            out.extend([CancelTimer(_ADAPT), CancelTimer(_REOPEN), Finish(self.acked.floor)])

    def _abort(self, reason: str, out: list[Any]) -> None:
        self._done = True
        out.extend([CancelTimer(_ADAPT), CancelTimer(_REOPEN), Abort(reason)])

    def _new_interval(self, now: float) -> None:
        self._interval_start = now
        self._interval_bytes = 0
        self._interval_chunks = 0
        self._interval_busy = True

    def _adapt(self, now: float, out: list[Any]) -> None:
        """Once per interval: judge the stream count, and break stalled streams."""
        elapsed = now - self._interval_start
        busy = bool(self._fresh or self._resend) or self.room() < self.chunk_bytes
        self._interval_busy = self._interval_busy and busy and self._synced
        if self._settling:
            # The stream count changed during this interval: a new stream spends it
            # connecting and in slow start, so it is judged on the next one.
            self._settling = False
            self._new_interval(now)
        elif not self._interval_busy:
            self._new_interval(now)  # the source, not the transport, was the limit
        elif self._interval_chunks >= MIN_CHUNKS_PER_INTERVAL and elapsed > 0:
            throughput = self._interval_bytes / elapsed
            self.controller.observe(throughput)
            if self._min_rtt is not None:  # the measured bandwidth-delay product
                self.controller.raise_to(streams_for_bdp(throughput * self._min_rtt, self.bounds))
            self._new_interval(now)
        for s, st in list(self._streams.items()):
            if st.state != _OPENING and st.chunks and now - st.progress > STALL_S:
                out.append(CloseStream(s))
                self._on_down(now, s, out)
                if self._done:
                    return
        self._refill(now, out)
        interval = MIN_INTERVAL_S
        if self._srtt is not None:
            interval = max(interval, RTTS_PER_INTERVAL * self._srtt)
        out.append(SetTimer(_ADAPT, now + interval))
