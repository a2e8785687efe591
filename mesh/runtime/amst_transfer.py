"""The trio runtime of AMST: raw TCP streams, each its own secure channel.

This is glue around the sans-I/O cores (:class:`mesh.amst.sender.AmstSender`,
:class:`mesh.amst.receiver.AmstReceiver`): it opens and accepts TCP streams, runs the
channel handshake, and executes the cores' actions. Payload work (the caller's
``prepare``, e.g. compression; CBOR framing; secretstream encryption and decryption;
SHA-256 only for a peer that does not read sealed chunks, :mod:`mesh.amst.receiver`)
runs in worker threads with ``trio.to_thread.run_sync``: hashlib,
libsodium (through cffi) and zstandard release the GIL, so the cores of the
machine work in parallel while the event loop only moves buffers.

Bulk bytes go over raw TCP, not websockets: on the reference machine one
trio-websocket connection moved 144 MB/s, raw trio TCP 3 GB/s (DESIGN.md).
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from mesh import wire
from mesh.amst.receiver import (
    Ack,
    AckArrived,
    AmstError,
    AmstReceiver,
    ChunkArrived,
    Deliver,
    End,
    EndArrived,
    Open,
    Reply,
    StreamDown,
    StreamUp,
)
from mesh.amst.sender import (
    DEFAULT_WINDOW_BYTES,
    Abort,
    AmstSender,
    ChunkOffered,
    ChunkWritten,
    CloseStream,
    Finish,
    LinkObserved,
    OpenStream,
    Release,
    SourceDone,
    Transmit,
)
from mesh.channel import ChannelError, SecureChannel
from mesh.core import CancelTimer, Notify, SetTimer, TimerFired
from mesh.links.modes import Mode
from mesh.runtime import admission
from mesh.runtime.admission import Startup, StartupGate, StartupLimits
from mesh.runtime.amst_stream import HANDSHAKE_TIMEOUT_S, NET_ERRORS, Link
from mesh.runtime.log import JsonLog

__all__ = [
    "ChunkSource",
    "TransferCut",
    "SendReport",
    "send_transfer",
    "AmstServer",
    "DATA_STARTUPS",
]

log = logging.getLogger("dwcp.amst")

_NET_ERRORS = NET_ERRORS
Buffer = bytes | memoryview
#: Frames a receiving stream decrypts ahead of the one being delivered: two keeps a worker
#: busy while the sink works, and bounds the receiver's memory to two chunks per stream.
READ_AHEAD = 2


class TransferCut(Exception):
    """The transfer could not continue (no stream reaches the receiver). Running
    :func:`send_transfer` again with the same transfer id resumes it. ``written_chunks``
    and ``written_bytes`` (payload) count the chunk frames written before the cut."""

    def __init__(self, reason: str, written_chunks: int = 0, written_bytes: int = 0) -> None:
        super().__init__(reason)
        self.written_chunks = written_chunks
        self.written_bytes = written_bytes


@runtime_checkable
class ChunkSource(Protocol):
    """Where a sender gets chunks: ``next_chunk(size_hint)`` returns ``(chunk_id, payload)``
    with ids 0, 1, 2, ... in order, or None at the end. ``size_hint`` is the chunk size AMST
    wants for the link (it shrinks under loss); a source may ignore it."""

    def next_chunk(self, size_hint: int) -> tuple[int, Buffer] | None: ...


class _IterSource:
    def __init__(self, chunks: Iterable[tuple[int, Buffer]]) -> None:
        self._it: Iterator[tuple[int, Buffer]] = iter(chunks)

    def next_chunk(self, size_hint: int) -> tuple[int, Buffer] | None:
        return next(self._it, None)


@attrs.frozen
class SendReport:
    chunks: int
    acked_bytes: int
    resent: int
    refused: int
    streams_opened: int
    streams_final: int  # the controller's stream count when the transfer finished
    streams_max_up: int  # most streams up at once
    max_in_flight: int
    window: int
    stream_history: tuple[tuple[int, float], ...]
    sends: tuple[tuple[int, int], ...]  # (chunk, times transmitted)
    #: chunk frames written whole to a stream, and their payload bytes (re-sends included)
    written_chunks: int = 0
    written_bytes: int = 0


# --------------------------------------------------------------------------- timers


class _Timers:
    """SetTimer / CancelTimer for one core, fired by a single task."""

    def __init__(self, fire: Callable[[Any], None]) -> None:
        self._at: dict[Any, float] = {}
        self._fire = fire
        self._changed = trio.Event()

    def apply(self, action: SetTimer | CancelTimer) -> None:
        if isinstance(action, SetTimer):
            self._at[action.key] = action.at
        else:
            self._at.pop(action.key, None)
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._changed = trio.Event()
            due = sorted((at, i) for i, at in enumerate(self._at.values()))
            if due and due[0][0] <= trio.current_time():
                key = list(self._at)[due[0][1]]
                del self._at[key]
                self._fire(TimerFired(key))
                continue
            with trio.move_on_at(due[0][0] if due else math.inf):
                await self._changed.wait()


# --------------------------------------------------------------------------- sender


class _SenderRun:
    def __init__(
        self,
        core: AmstSender,
        source: ChunkSource,
        connect: Callable[[], Awaitable[trio.abc.Stream]],
        new_channel: Callable[[], SecureChannel],
        prepare: Callable[[int, Buffer], bytes] | None,
        preparers: int,
    ) -> None:
        self.core = core
        self.source = source
        self.connect = connect
        self.new_channel = new_channel
        self.prepare = prepare
        self.preparers = preparers
        self.payloads: dict[int, bytes] = {}  # chunk -> prepared payload
        self.queues: dict[int, deque[int]] = {}
        self.links: dict[int, Link] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.stream_done: dict[int, trio.Event] = {}
        self.reserved = 0
        self.source_open = True
        self.pulling = 0
        self.changed = trio.Event()
        self.finished = trio.Event()
        self.abort: str | None = None
        self.written_chunks = 0
        self.written_bytes = 0
        self.notes: dict[str, int] = {}
        self.nursery: trio.Nursery | None = None
        self.timers = _Timers(self.feed)

    def feed(self, event: Any) -> None:
        self.apply(self.core.handle(trio.current_time(), event))

    def apply(self, actions: list[Any]) -> None:
        assert self.nursery is not None
        for a in actions:
            if isinstance(a, Transmit):
                self.queues[a.stream].append(a.chunk)
            elif isinstance(a, Release):
                self.payloads.pop(a.chunk, None)
            elif isinstance(a, OpenStream):
                self.queues[a.stream] = deque()
                self.nursery.start_soon(self._stream, a.stream)
            elif isinstance(a, CloseStream):
                self.nursery.start_soon(self._close_stream, a.stream)
            elif isinstance(a, (SetTimer, CancelTimer)):
                self.timers.apply(a)
            elif isinstance(a, Notify):
                self.notes[a.kind] = self.notes.get(a.kind, 0) + 1
                log.info("%s %s", a.kind, a.detail)
            elif isinstance(a, Finish):
                self.nursery.start_soon(self._finish, a.total)
            elif isinstance(a, Abort):
                self.abort = a.reason
                self.finished.set()
        self.changed.set()  # wake every task waiting for a change; later waits take a new event
        self.changed = trio.Event()

    async def _wait_change(self) -> None:
        await self.changed.wait()

    async def _close_stream(self, s: int) -> None:
        """Send the final frame; the stream's task ends when the receiver closes too, or is
        cancelled if it does not within the handshake timeout (a stalled stream)."""
        link = self.links.get(s)
        if link is not None:
            await link.send_final()
        done = self.stream_done.get(s)
        if done is not None:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                await done.wait()
        scope = self.scopes.get(s)
        if scope is not None:
            scope.cancel()

    async def _finish(self, total: int) -> None:
        async def end(s: int, link: Link) -> None:
            try:
                await link.send_message(End(total))
            except (*_NET_ERRORS, wire.WireError) as exc:
                log.info("stream %d broke while ending the transfer: %s", s, exc)
            await self._close_stream(s)

        async with trio.open_nursery() as nursery:
            for s, link in sorted(self.links.items()):
                nursery.start_soon(end, s, link)
        self.finished.set()

    # ------------------------------------------------------------------ producing

    async def produce(self) -> None:
        """One preparer: pull a chunk, prepare it off the event loop, offer it."""
        while self.source_open:
            bound = _prepared_bound(self.core.chunk_bytes)
            if self.core.room() - self.reserved < bound:
                await self._wait_change()
                continue
            item = self.source.next_chunk(self.core.chunk_bytes)
            if item is None:
                self.source_open = False
                break
            chunk, raw = item
            if chunk in self.core.acked:  # resuming: the receiver already has it
                continue
            bound = _prepared_bound(len(raw))
            if bound > self.core.window:
                raise AmstError(f"chunk {chunk} of {len(raw)} bytes cannot fit the window")
            while self.core.room() - self.reserved < bound:  # a chunk larger than the hint
                await self._wait_change()
            self.reserved += bound
            self.pulling += 1
            try:
                payload = await trio.to_thread.run_sync(_prepare, self.prepare, chunk, raw)
            finally:
                self.reserved -= bound
                self.pulling -= 1
            if len(payload) > bound:
                raise AmstError(f"prepare grew chunk {chunk} from {len(raw)} to {len(payload)}")
            self.payloads[chunk] = payload
            self.feed(ChunkOffered(chunk, len(payload)))
        if self.pulling == 0 and not self.core.done:
            self.feed(SourceDone())

    # ------------------------------------------------------------------ streams

    async def _stream(self, s: int) -> None:
        self.stream_done[s] = trio.Event()
        with trio.CancelScope() as scope:
            self.scopes[s] = scope
            try:
                await self._run_stream(s)
            except* (*_NET_ERRORS, wire.WireError, trio.TooSlowError) as group:
                log.info("stream %d down: %s", s, group.exceptions[0])
        self.scopes.pop(s, None)
        self.stream_done.pop(s).set()
        link = self.links.pop(s, None)
        if link is not None:
            await link.aclose()
        self.queues.pop(s, None)
        if not self.core.done:
            self.feed(StreamDown(s))

    async def _run_stream(self, s: int) -> None:
        sock = await self.connect()
        link = Link(sock, self.new_channel())
        self.links[s] = link
        await link.handshake()
        await link.send_message(Open(self.core.transfer, s))
        first = await link.next_message((Ack,))
        if first is None:
            raise ChannelError("truncated", "receiver closed before acknowledging")
        self.feed(StreamUp(s))
        self.feed(AckArrived(s, first))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_chunks, s, link)
            await self._read_acks(s, link)
            nursery.cancel_scope.cancel()

    async def _read_acks(self, s: int, link: Link) -> None:
        """Until the receiver closes its direction after ours (a clean end)."""
        while True:
            ack = await link.next_message((Ack,))
            if ack is None:
                return
            self.feed(AckArrived(s, ack))

    async def _write_chunks(self, s: int, link: Link) -> None:
        queue = self.queues[s]
        while True:
            if not queue:
                await self._wait_change()
                continue
            chunk = queue.popleft()
            payload = self.payloads.get(chunk)
            if payload is not None:
                await link.send_chunk(chunk, payload)
                self.written_chunks += 1
                self.written_bytes += len(payload)
            self.feed(ChunkWritten(s, chunk))


def _prepared_bound(size: int) -> int:
    """The most window a chunk of ``size`` raw bytes may take once prepared: zstd's
    ZSTD_COMPRESSBOUND (size + size/256, plus at most 64 bytes for small inputs) and 1 KiB
    for a caller's header. A ``prepare`` that grows a chunk beyond it is refused."""
    return size + (size >> 8) + 1024


def _prepare(prepare: Callable[[int, Buffer], bytes] | None, chunk: int, raw: Buffer) -> bytes:
    """Worker thread: the caller's transform (e.g. compression). The stream adds a digest
    if its peer needs one (:meth:`mesh.runtime.amst_stream.Link.send_chunk`)."""
    return bytes(raw) if prepare is None else prepare(chunk, raw)


async def send_transfer(
    transfer: bytes,
    source: ChunkSource | Iterable[tuple[int, Buffer]],
    *,
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    new_channel: Callable[[], SecureChannel],
    mode: str | Mode = "datacenter",
    window_bytes: int | None = None,
    prepare: Callable[[int, Buffer], bytes] | None = None,
    preparers: int = 2,
    link: LinkObserved | None = None,
    core: AmstSender | None = None,
) -> SendReport:
    """Send every chunk of ``source`` to the receiver reached by ``connect``.

    ``prepare(chunk_id, raw)`` (e.g. zstd compression) runs in a worker thread;
    ``preparers`` chunks are prepared at once. Raises :class:`TransferCut` when no
    stream can reach the receiver; calling again with the same ``transfer`` resumes
    without re-sending what the receiver acknowledged.
    """
    if core is None:
        core = AmstSender(transfer, mode=mode, window_bytes=window_bytes or DEFAULT_WINDOW_BYTES)
    src = source if isinstance(source, ChunkSource) else _IterSource(source)
    run = _SenderRun(core, src, connect, new_channel, prepare, preparers)
    async with trio.open_nursery() as nursery:
        run.nursery = nursery
        nursery.start_soon(run.timers.run)
        run.apply(core.start(trio.current_time()))
        if link is not None:
            run.feed(link)
        for _ in range(preparers):
            nursery.start_soon(run.produce)
        await run.finished.wait()
        nursery.cancel_scope.cancel()
    if run.abort is not None:
        raise TransferCut(run.abort, run.written_chunks, run.written_bytes)
    return SendReport(
        chunks=core.acked.floor,
        acked_bytes=core.acked_bytes,
        resent=core.resent,
        refused=core.refused,
        streams_opened=core.streams_opened,
        streams_final=core.controller.target,
        streams_max_up=core.max_streams_up,
        max_in_flight=core.max_in_flight,
        window=core.window,
        stream_history=tuple(core.controller.history),
        sends=tuple(sorted(core.sends.items())),
        written_chunks=run.written_chunks,
        written_bytes=run.written_bytes,
    )


# --------------------------------------------------------------------------- receiver


Sink = Callable[[int, bytes], Awaitable[None]]


class _Incoming:
    def __init__(self, core: AmstReceiver, sink: Sink) -> None:
        self.core = core
        self.sink = sink
        self.complete = trio.Event()


#: Serves a connection whose first message (after the channel handshake) is not Open.
Opener = Callable[[Link, Any], Awaitable[None]]

#: Unauthenticated data connections (admission.StartupGate). A transfer opens up to 16
#: streams at once (AMST's internet bound, mesh.amst.policy.STREAM_BOUNDS), each with a
#: handshake, and two transfers may start together from one DC: 32 per source. ``start``
#: is twice that, so one address alone never pushes the listener into early drop;
#: OpenSSH's rate (30 %) and full = 4 x start (its default 10:30:100 scaled) bound a flood.
DATA_STARTUPS = StartupLimits(start=64, rate=30, full=256, per_source=32)


class AmstServer:
    """Accepts AMST streams (pass :meth:`handle_stream` to ``trio.serve_tcp``) for the
    transfers announced with :meth:`expect`. A transfer's receiver core outlives its
    streams, so a sender that reconnects resumes where it was.

    ``openers`` maps other first messages to their handlers, which take over the
    connection (e.g. a relay request): one listener, one handshake, then either."""

    def __init__(self, new_channel: Callable[[], SecureChannel],
                 openers: dict[type, Opener] | None = None,
                 rng: random.Random | None = None) -> None:
        self.new_channel = new_channel
        self.openers = dict(openers or {})
        self.transfers: dict[bytes, _Incoming] = {}
        self.notes: dict[str, int] = {}
        #: connections dropped before their handshake completed, by reason (admission's
        #: "source_limit", "early_drop", "startups_full"; "handshake_deadline", a
        #: ChannelError reason, "connection_failed"), and accept back-offs
        self.refused: dict[str, int] = {}
        self.gate = StartupGate(DATA_STARTUPS, rng if rng is not None else random.Random())
        self._next_stream = 0

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    async def serve(self, listeners: list[trio.SocketListener], log: JsonLog,
                    *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept AMST streams on ``listeners`` until cancelled: unauthenticated
        connections are capped (:data:`DATA_STARTUPS`), one connection's fault ends that
        connection only, and running out of descriptors backs off."""
        await admission.serve_listeners(self.handle_stream, listeners, self.gate, log=log,
                                        count=self._refuse, what="data",
                                        task_status=task_status)

    def expect(self, transfer: bytes, sink: Sink) -> AmstReceiver:
        """Accept streams of ``transfer``; verified chunks go to ``sink(chunk_id, payload)``,
        each exactly once. The sink is awaited before the chunk is acknowledged."""
        incoming = self.transfers.get(transfer)
        if incoming is None:
            incoming = self.transfers[transfer] = _Incoming(AmstReceiver(transfer), sink)
        incoming.sink = sink
        return incoming.core

    async def wait_complete(self, transfer: bytes) -> AmstReceiver:
        incoming = self.transfers[transfer]
        await incoming.complete.wait()
        return incoming.core

    async def handle_stream(self, sock: trio.abc.Stream, startup: Startup | None = None) -> None:
        """Serve one accepted connection: the handshake (within HANDSHAKE_TIMEOUT_S), then
        a transfer's stream or an opener's protocol. Nothing the peer does escapes as an
        exception: every fault ends this connection, noted and counted."""
        link = Link(sock, self.new_channel())
        stream = self._next_stream
        self._next_stream += 1
        incoming: _Incoming | None = None
        try:
            try:
                await link.handshake()
            except ChannelError as exc:
                self._refuse(exc.reason)
                raise
            except trio.TooSlowError:
                self._refuse("handshake_deadline")
                raise
            if startup is not None:
                startup.authenticated()
            opening = await link.next_message((Open, *self.openers))
            if opening is None:
                return
            if not isinstance(opening, Open):
                await self.openers[type(opening)](link, opening)
                return
            incoming = self.transfers.get(opening.transfer)
            if incoming is None:
                self._note("amst.unknown_transfer", opening.transfer.hex())
                return
            await self._apply(incoming, link, stream, StreamUp(stream))
            await self._receive_chunks(incoming, link, stream)
        except* (*_NET_ERRORS, wire.WireError, trio.TooSlowError) as group:
            self._note("amst.stream_error", f"stream {stream}: {group.exceptions[0]}")
        except* AmstError as group:
            self._note("amst.protocol_error", f"stream {stream}: {group.exceptions[0]}")
        except* Exception as group:  # a fault of this connection ends it, not the listener
            self._refuse("connection_failed")
            fault = group.exceptions[0]
            self._note("amst.connection_failed",
                       f"stream {stream}: {type(fault).__name__}: {fault}")
        finally:
            if incoming is not None:
                incoming.core.handle(trio.current_time(), StreamDown(stream))
            await link.aclose()

    async def _receive_chunks(self, incoming: _Incoming, link: Link, stream: int) -> None:
        """A reader decrypts and checks the next frames in a worker while this task hands
        the previous one to the core and the sink."""
        frames, next_frame = trio.open_memory_channel[Any](READ_AHEAD)

        async def read_ahead() -> None:
            async with frames:
                while True:
                    got = await link.receive_bulk()
                    await frames.send(got)
                    if got is None or got[0] is None:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_ahead)
            async with next_frame:
                async for got in next_frame:
                    if got is None:
                        return
                    msg, valid = got
                    if isinstance(msg, End):
                        await self._apply(incoming, link, stream, EndArrived(stream, msg))
                    elif msg is not None:
                        event = ChunkArrived(stream, msg, valid)
                        await self._apply(incoming, link, stream, event)
                    else:  # the sender closed its direction: close ours
                        await link.send_final()
                        return

    async def _apply(self, incoming: _Incoming, link: Link, stream: int, event: Any) -> None:
        for a in incoming.core.handle(trio.current_time(), event):
            if isinstance(a, Deliver):
                # The core counts the chunk received from here on (its Acks on the other
                # streams say so), so the sink must take it even if this stream breaks now.
                with trio.CancelScope(shield=True):
                    await incoming.sink(a.chunk, a.payload)
            elif isinstance(a, Reply):
                assert a.stream == stream, "a receiver answers on the stream it heard from"
                await link.send_message(a.message)
            elif isinstance(a, Notify):
                self._note(a.kind, a.detail)
                if a.kind == "amst.complete":
                    incoming.complete.set()

    def _note(self, kind: str, detail: Any) -> None:
        self.notes[kind] = self.notes.get(kind, 0) + 1
        log.info("%s %s", kind, detail)
