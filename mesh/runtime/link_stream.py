"""The socket under a control link, and the switch from websocket messages to frames of
our own (:data:`mesh.versions.CONTROL_FRAMES`, issue 14).

A control connection opens as a websocket (the HTTP upgrade, the channel handshake, the
link hellos: one websocket message per channel frame). When both ends offered
``CONTROL_FRAMES``, each then carries the channel's frames straight on the TCP stream,
``mesh.channel.frame`` style: a 4-byte big-endian length, then one secretstream frame.
The link reader reads the socket itself (:meth:`DirectStream.receive_frames`): no
trio-websocket reader task, no memory channel per message, no RFC 6455 masking.

**The switch point.** trio-websocket's reader task reads the socket ahead of what is
asked of it and parses every byte it read as websocket frames; a byte of ours that it
read would be taken for a broken websocket frame. So no end writes a framed byte before
the other end's websocket reader has stopped, and each stops it when the peer can no
longer send it anything (``I``: the initiator, ``R``: the responder)::

    I -> R   LinkHello   (websocket; I's last websocket message, then I waits)
    R        stops its websocket reader: I sends nothing until R's hello
    R -> I   LinkHello   (websocket; R's last websocket message, then R reads frames)
    I        stops its websocket reader: R sends nothing until I's first frame
    I -> R   LinkFramed  (our framing; the first frame either way)

Stopping the websocket reader (:meth:`DirectStream.stop_websocket_reader`) parks
trio-websocket's reader task in the stream's ``receive_some`` for good (a read in
flight is cancelled, which consumes no byte; one that completed meanwhile hands its
bytes to the frame reader), and then checks that wsproto holds no byte of a frame and
no message is queued: bytes across the switch point from a peer that broke the order
above end the connection as ``malformed``, they are never dropped.

**Limits.** Every length is checked before a byte of its frame is kept
(:class:`mesh.channel.FrameReader`, at most the open channel's ``max_frame``, the limit
trio-websocket enforced as its ``max_message_size``), and a read takes at most
``RECEIVE_BYTES``; the handshake itself still runs over the websocket, under its bounds.

**Keepalive.** Without websocket pings, each end sends a :class:`LinkHeartbeat` when
it has sent nothing for ``HEARTBEAT_INTERVAL``, and ends the link (``keepalive_timeout``)
when no byte arrived for ``IDLE_TIMEOUT``: a peer that vanished without a FIN
is noticed within the 7.5 s of the websocket keepalive (``KEEPALIVE_INTERVAL +
KEEPALIVE_TIMEOUT``), and an idle link costs one small frame per direction per 2.5 s.

**Close.** Unchanged above the socket: final frame for final frame, then the socket is
closed (:func:`close_connection`) without a websocket closing handshake, which the peer
would take for frames.
"""

from __future__ import annotations

import os
from typing import Any

import trio
from trio_websocket import CloseReason, WebSocketConnection

from mesh.channel import FRAME_OVERHEAD, LENGTH_BYTES, ChannelError, FrameReader, SecureChannel

__all__ = [
    "DirectStream",
    "install",
    "close_connection",
    "RECEIVE_BYTES",
    "HEARTBEAT_INTERVAL",
    "IDLE_TIMEOUT",
    "KEEPALIVE_TICK",
    "prefixed",
    "sealed",
]

#: Bytes asked of the socket per read on an open link. trio-websocket's default is 4 KiB,
#: so a PBFT burst (a 17-request batch is ~5 KiB, a bundle up to 256 KiB) took several
#: reads, each a trip through the event loop; 256 KiB is one bundle (link.BUNDLE_BYTES),
#: read at once when it has arrived.
RECEIVE_BYTES = 256 * 1024
#: A framed link sends a heartbeat after this long without sending anything: the
#: websocket keepalive's ping interval (link.KEEPALIVE_INTERVAL).
HEARTBEAT_INTERVAL = 2.5
#: ... and ends when nothing arrived for this long: a heartbeat interval plus the
#: websocket keepalive's pong timeout (5 s), the same 7.5 s inside issue 2's 10 s
#: reconnect bound, with two heartbeats' slack for a loaded machine.
IDLE_TIMEOUT = 7.5
#: How often the keepalive looks at the link's counters: both bounds hold to within it.
KEEPALIVE_TICK = 0.5


def prefixed(frame: bytes) -> bytes:
    """``frame`` as it goes on a framed stream."""
    return len(frame).to_bytes(LENGTH_BYTES, "big") + frame


def sealed(channel: SecureChannel, plaintext: bytes) -> bytearray:
    """``plaintext`` encrypted into one frame, length-prefixed: ``prefixed(channel.send(
    plaintext))`` built in place (one buffer, libsodium called directly)."""
    size = len(plaintext) + FRAME_OVERHEAD
    out = bytearray(LENGTH_BYTES + size)
    out[:LENGTH_BYTES] = size.to_bytes(LENGTH_BYTES, "big")
    channel.send_into(plaintext, memoryview(out)[LENGTH_BYTES:])
    return out


class DirectStream:
    """The link's socket stream as trio-websocket sees it (it replaces the connection's
    ``_stream``), with a write that never waits (:meth:`try_write`), the switch to our
    framing (:meth:`stop_websocket_reader`) and the framed read (:meth:`receive_frames`).

    Every byte leaves in the order it was handed over: what :meth:`try_write` could not
    write now is *pending*, and the next :meth:`send_all` (trio-websocket's own sends:
    our frames from the writer task, pings, pongs, the close; or the framed writer's)
    writes it before its own data; sends take turns (the writer's :meth:`flush` is not
    under trio-websocket's lock). :meth:`try_write` refuses while a ``send_all`` is under
    way or waiting (it may have written part of its data) or bytes are pending.
    Everything else is the wrapped stream's."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self._pending = b""
        #: tasks in or waiting for :meth:`send_all` (trio-websocket's, under its own lock,
        #: and the link writer's :meth:`flush`, which is not under that lock)
        self._senders = 0
        self._lock = trio.StrictFIFOLock()
        #: frames on the TCP stream (after :meth:`stop_websocket_reader`)
        self.framed = False
        self._ws_read: trio.CancelScope | None = None
        self._ws_reads = 0
        self._ws_parked = trio.Event()
        #: bytes a websocket read took after the switch point (they are frames)
        self._carried = b""
        #: frames read and split but not handed to the link yet (:meth:`unread`)
        self._ready: list[bytes] = []
        self.frames: FrameReader | None = None
        #: the last framed read took all the socket had (wait before the next)
        self._drained = True
        #: framed reads that brought bytes: the keepalive's sign of a live peer (bytes,
        #: not frames, so a large frame arriving slowly is not taken for silence)
        self.reads = 0
        #: the framed reads' buffer, reused (created at the switch). A read into a fresh
        #: 256 KiB bytes object cost ~25 us (glibc maps and unmaps it: above its mmap
        #: threshold) against ~5 us into this one; the frame reader copies out each frame.
        self._rbuf = bytearray()
        self._rview = memoryview(self._rbuf)

    @property
    def inner(self) -> trio.SocketStream:
        return self._inner

    def __getattr__(self, name: str) -> Any:  # socket, setsockopt, ...
        return getattr(self._inner, name)

    # ------------------------------------------------------------------ sending

    @property
    def pending(self) -> bool:
        """Bytes handed to :meth:`try_write` that the kernel has not taken yet."""
        return bool(self._pending)

    @property
    def writable_now(self) -> bool:
        """:meth:`try_write` would try (nothing is being sent, nothing is pending)."""
        return self._senders == 0 and not self._pending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._senders += 1
        try:
            async with self._lock:
                while self._pending:
                    pending, self._pending = self._pending, b""
                    await self._inner.send_all(pending)
                if data:
                    await self._inner.send_all(data)
        finally:
            self._senders -= 1

    async def flush(self) -> None:
        """Write the pending bytes (waiting for the socket as ``send_all`` does)."""
        await self.send_all(b"")

    def try_write(self, data: bytes | bytearray) -> bool:
        """Write ``data`` without waiting: True if the stream took it (what the socket
        did not take now is pending, see :attr:`pending`), False if it refused (a send
        is under way, bytes are pending, or the socket failed: the caller sends it the
        usual way, which meets the same failure and ends the link)."""
        if not self.writable_now:
            return False
        try:
            # trio's sockets are non-blocking: a full send buffer raises, never waits
            written = os.write(self._inner.socket.fileno(), data)
        except BlockingIOError:
            written = 0
        except OSError:
            return False
        if written < len(data):
            self._pending = bytes(data[written:])
        return True

    async def aclose(self) -> None:
        await self._inner.aclose()

    # ------------------------------------------------------------------ reading

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """trio-websocket's reader task reads here, until the switch point."""
        if not self.framed:
            self._ws_reads += 1
            with trio.CancelScope() as scope:
                self._ws_read = scope
                try:
                    data = await self._inner.receive_some(max_bytes)
                finally:
                    self._ws_read = None
                if not self.framed:
                    return data
                # the read completed as the switch was made: its bytes are frames
                self._carried += data
        self._ws_parked.set()
        await trio.sleep_forever()  # until the connection's nursery is cancelled

    def websocket_reads_only(self) -> None:
        """No switch will come (a peer without CONTROL_FRAMES): trio-websocket reads the
        socket directly, without this stream's switch point."""
        self.receive_some = self._inner.receive_some  # type: ignore[method-assign]

    async def stop_websocket_reader(self, ws: WebSocketConnection, max_frame: int) -> None:
        """The switch point: park trio-websocket's reader task for good; from here the
        stream carries length-prefixed frames of at most ``max_frame`` bytes, read with
        :meth:`receive_frames`. Raises ``malformed`` if the websocket holds anything
        past its last message (the peer broke the order of the module docstring)."""
        if not self._ws_reads:  # a read from before install() could take our frames
            raise ChannelError("malformed", "no websocket read since the handshake began")
        self.framed = True
        if self._ws_read is not None:
            self._ws_read.cancel()
        await self._ws_parked.wait()
        self.frames = FrameReader(max_frame)
        self._rbuf = bytearray(RECEIVE_BYTES)
        self._rview = memoryview(self._rbuf)
        # wsproto 1.3's frame buffer (pinned by tests/test_link_frames.py)
        connection = ws._wsproto.connection
        buffered = len(connection._proto._frame_decoder.buffer) if connection else 0
        queued = ws._recv_channel.statistics().current_buffer_used
        if buffered or queued:
            raise ChannelError("malformed", f"{buffered} websocket bytes and {queued} messages "
                                            "past the switch to frames")

    async def receive_frames(self) -> list[bytes]:
        """The next frames from the socket (at least one); ``[]`` at the end of the
        stream (EOF, reset or closed by us). Raises ``oversized`` for a length over the
        limit, before a byte of that frame is kept."""
        assert self.frames is not None, "not switched to frames"
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        if self._carried:
            carried, self._carried = self._carried, b""
            got = self.frames.feed(carried)
            if got:
                return got
        while True:
            data = await self._read()
            if not data:
                return []
            got = self.frames.feed(data)
            if got:
                return got

    async def _read(self) -> bytes | memoryview:
        """One read of the socket, b"" at its end (EOF, reset, closed by us).

        Not trio's ``receive_some``: that tries the read before it waits (a failed
        ``recv`` per message on a link that is mostly idle between messages) inside an
        async context manager, and yields after a read that did not wait. Here a read
        that drained the socket (it returned less than asked) is followed by a wait for
        readability, and one that may have left bytes behind by a checkpoint and a read:
        every call is a checkpoint either way, so a peer that floods the link cannot
        starve the other tasks or delay a cancellation."""
        while True:
            fd = self._inner.socket.fileno()
            if fd < 0:  # closed by us (aclose): never read a reused descriptor
                return b""
            try:
                if self._drained:
                    await trio.lowlevel.wait_readable(self._inner.socket)
                else:
                    await trio.lowlevel.checkpoint()
                n = os.readv(fd, [self._rbuf])
            except BlockingIOError:
                self._drained = True
                continue
            except (OSError, trio.ClosedResourceError):  # reset, or closed while waiting
                return b""
            self._drained = n < RECEIVE_BYTES
            self.reads += 1
            return self._rview[:n]

    def unread(self, frames: list[bytes]) -> None:
        """Frames for the next :meth:`receive_frames`, before anything read later."""
        self._ready = frames + self._ready


def install(ws: WebSocketConnection) -> DirectStream | None:
    """Put a :class:`DirectStream` under ``ws`` (trio-websocket 0.12.2's ``_stream``,
    pinned by a test), or return the one there; None for a stream that is not a socket."""
    stream = getattr(ws, "_stream", None)
    if isinstance(stream, DirectStream):
        return stream
    if isinstance(stream, trio.SocketStream):
        direct = DirectStream(stream)
        ws._stream = direct  # type: ignore[assignment]
        return direct
    return None


async def close_connection(ws: WebSocketConnection) -> None:
    """Close ``ws``: the websocket closing handshake, or for a framed link just the
    socket (the peer would read a websocket close frame as a frame of ours)."""
    stream = getattr(ws, "_stream", None)
    if isinstance(stream, DirectStream) and stream.framed:
        if ws._close_reason is None:
            ws._close_reason = CloseReason(1000, "framed link closed")
        await ws._close_stream()
        return
    await ws.aclose()
