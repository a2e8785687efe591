"""One AMST stream: a TCP connection carrying one secure channel, with length-prefixed
frames (the :func:`mesh.channel.frame` layout: 4-byte big-endian length, then the frame).

Small frames (the handshake, Open, Ack, End) go through trio on the event loop.
Bulk frames are read and written by worker threads: a worker encodes, encrypts and
writes a whole chunk frame, or reads, decrypts, decodes and hashes one, so the
kernel's copying and the crypto of all streams run on all cores while the event
loop only schedules. The workers use a duplicate of the socket's descriptor, in
non-blocking mode like trio's own, waiting with ``poll``; closing the link shuts the
connection down, which wakes them.

A bulk frame costs its bytes' crypto and one copy at each end, as the tuned channel
path of ``dwcp bench channel`` does (issue 17): the sender writes the chunk's CBOR head
and payload into a plaintext buffer (:func:`mesh.wire.encode_parts`: the payload is
never run through cbor2), encrypts it with :meth:`SecureChannel.send_into` into a
frame buffer that keeps room for the length prefix, and sends that buffer; the receiver
reads the frame with ``recv_into`` into a buffer, decrypts it with
:meth:`SecureChannel.receive_frame_into` into another and decodes the message from that
view (the payload is copied out once, :func:`mesh.wire.decode`). The buffers belong to
the link and are reused from frame to frame; a worker abandoned by a cancelled task
keeps the ones it holds, and the next frame gets new ones.

Frames are read exactly (header, then body), never past the end of a frame, so the
trio reader and the thread reader can take turns on one connection. A frame's declared
length is checked against what the channel accepts next (:attr:`SecureChannel.max_frame`:
a Hello is at most 1 KiB) before a byte of its body is read.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import trio

from mesh import versions, wire
from mesh.amst.receiver import Chunk, End, SealedChunk, chunk_digest
from mesh.channel import FRAME_OVERHEAD, ChannelError, Closed, Data, SecureChannel

__all__ = ["Link", "NET_ERRORS", "HANDSHAKE_TIMEOUT_S"]

log = logging.getLogger("dwcp.amst")

#: A peer that has not finished the three-frame handshake in 10 s is not coming: the
#: handshake is two round trips plus two signatures (~1 ms of CPU).
HANDSHAKE_TIMEOUT_S = 10.0
#: How often a worker blocked on a quiet socket checks whether its link was closed.
POLL_MS = 200

NET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ChannelError)


class Link:
    """A TCP stream with one secure channel on it."""

    def __init__(self, sock: trio.abc.Stream, channel: SecureChannel) -> None:
        self.sock = sock
        self.channel = channel
        self.send_lock = trio.Lock()
        self._raw: socket.socket | None = None
        self._users = 0
        self._closing = False
        self._guard = threading.Lock()
        #: the workers' duplicate descriptor is made at the first bulk frame, so a
        #: connection that never gets past its handshake holds one descriptor, not two
        self._can_dup = isinstance(sock, trio.SocketStream)
        #: the bulk path's reusable buffers, by use ("plain", "sealed", "rx_sealed",
        #: "rx_plain"); a worker takes one out while it uses it (see _take)
        self._spare: dict[str, bytearray] = {}

    def _bulk_socket(self) -> socket.socket | None:
        """The duplicate of the connection's descriptor that the workers use (made now if
        it is not yet); None when the stream is not a socket. Out of descriptors, this
        raises OSError (EMFILE), which ends this stream only."""
        with self._guard:
            if self._raw is None and self._can_dup and not self._closing:
                s = self.sock.socket  # type: ignore[attr-defined]
                raw = socket.fromfd(s.fileno(), s.family, s.type)
                raw.setblocking(False)
                self._raw = raw
            return self._raw

    # ------------------------------------------------------------------ event-loop side

    async def handshake(self) -> None:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await self._flush_handshake()
            while not self.channel.is_open:
                raw = await self._read_frame()
                if raw is None:
                    raise ChannelError("truncated", "stream ended during the handshake")
                self.channel.receive_frame(raw)
                await self._flush_handshake()

    async def _flush_handshake(self) -> None:
        for f in self.channel.frames_to_send():
            await self.sock.send_all(len(f).to_bytes(4, "big") + f)

    async def _read_exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            data = await self.sock.receive_some(n - len(buf))
            if not data:
                if buf:
                    raise ChannelError("truncated", f"stream ended inside a frame ({len(buf)}/{n})")
                return None
            buf += data
        return bytes(buf)

    async def _read_frame(self) -> bytes | None:
        head = await self._read_exactly(4)
        if head is None:
            return None
        n = _frame_length(head, self.channel.max_frame)
        body = await self._read_exactly(n)
        if body is None:
            raise ChannelError("truncated", "stream ended after a frame header")
        return body

    async def next_message(self, expect: tuple[type, ...]) -> Any:
        """The next small message, decrypted here on the event loop; None at a clean end."""
        while True:
            raw = await self._read_frame()
            if raw is None:
                self.channel.end_of_stream()  # raises truncated unless the peer closed cleanly
                return None
            for event in self.channel.receive_frame(raw):
                if isinstance(event, Data):
                    return wire.decode(event.payload, expect=expect)
                assert isinstance(event, Closed)

    async def send_message(self, message: Any) -> None:
        data = self.channel.send(wire.encode(message))
        async with self.send_lock:
            await self.sock.send_all(len(data).to_bytes(4, "big") + data)

    async def send_final(self) -> None:
        """Close our direction with the channel's final frame (a clean end, not a cut)."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            try:
                data = self.channel.close()
                async with self.send_lock:
                    await self.sock.send_all(len(data).to_bytes(4, "big") + data)
            except NET_ERRORS as exc:
                log.info("final frame not sent: %s", exc)

    async def aclose(self) -> None:
        with self._guard:
            self._closing = True
            self._spare.clear()  # a closed link holds no frame buffers
            if self._raw is not None:
                with contextlib.suppress(OSError):  # already shut: nothing to wake
                    self._raw.shutdown(socket.SHUT_RDWR)  # wakes any worker
                if self._users == 0:
                    self._raw.close()
        with trio.CancelScope(shield=True):
            await self.sock.aclose()

    def detach(self) -> trio.abc.Stream:
        """Leave the connection to another protocol (a relayed stream runs its own channel
        over it once the relay accepted): returns the TCP stream, still open. Only the
        event-loop side may have been used."""
        with self._guard:
            if self._users:
                raise RuntimeError("a worker still uses the link")
            self._closing = True
            self._can_dup = False
            if self._raw is not None:
                self._raw.close()  # the duplicate descriptor only: the connection stays up
                self._raw = None
        return self.sock

    # ------------------------------------------------------------------ bulk, in workers

    @property
    def sealed_chunks(self) -> bool:
        """Chunks go as :class:`SealedChunk` (no SHA-256): both channel ends offered
        :data:`mesh.versions.AMST_SEALED`. Else as :class:`Chunk` with its digest."""
        return versions.both_offer(versions.AMST_SEALED, self.channel.versions,
                                   self.channel.peer_versions)  # fmt: skip

    async def send_chunk(self, chunk: int, payload: bytes) -> None:
        """Send chunk ``chunk``: its message (:meth:`_message`) built, sealed and written
        in a worker."""
        async with self.send_lock:
            if self._bulk_socket() is not None:
                await self._in_worker(self._seal_and_send, chunk, payload)
            else:  # not a socket (a test stream, a wrapper): seal in a worker, write here
                data = await trio.to_thread.run_sync(self._seal, chunk, payload)
                await self.sock.send_all(len(data).to_bytes(4, "big") + data)

    async def receive_bulk(self) -> tuple[Any, bool] | None:
        """The next frame, decrypted, decoded and (a Chunk) checked against its digest:
        ``(message, valid)`` (a SealedChunk is valid: the channel authenticated it);
        ``(None, False)`` for the peer's final frame; None at EOF."""
        if self._bulk_socket() is not None:
            return await self._in_worker(self._read_and_open)  # type: ignore[no-any-return]
        raw = await self._read_frame()
        if raw is None:
            self.channel.end_of_stream()
            return None
        return await trio.to_thread.run_sync(self._open, raw)

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(self._use, fn, *args, abandon_on_cancel=True)

    def _use(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._guard:
            if self._closing:
                raise trio.ClosedResourceError("link closed")
            self._users += 1
        try:
            return fn(*args)
        finally:
            with self._guard:
                self._users -= 1
                if self._closing and self._users == 0 and self._raw is not None:
                    self._raw.close()

    def _take(self, use: str, size: int) -> bytearray:
        """The link's buffer for ``use``, at least ``size`` bytes (grown when smaller;
        a new one when a worker abandoned by a cancelled task still holds it)."""
        with self._guard:
            buf = self._spare.pop(use, None)
        if buf is None or len(buf) < size:
            buf = bytearray(size)
        return buf

    def _give(self, use: str, buf: bytearray) -> None:
        with self._guard:
            self._spare[use] = buf

    def _message(self, chunk: int, payload: bytes) -> Chunk | SealedChunk:
        """The chunk's message for this stream's peer (worker thread: the digest)."""
        if self.sealed_chunks:
            return SealedChunk(chunk, payload)
        return Chunk(chunk, chunk_digest(payload), payload)

    def _plaintext(self, chunk: int, payload: bytes) -> tuple[bytearray, int]:
        """The chunk's frame in the link's plaintext buffer (taken: give it back)."""
        head, tail = wire.encode_parts(self._message(chunk, payload))
        n = len(head) + len(tail)
        plain = self._take("plain", n)
        plain[: len(head)] = head
        plain[len(head) : n] = tail
        return plain, n

    def _seal(self, chunk: int, payload: bytes) -> bytes:
        plain, n = self._plaintext(chunk, payload)
        try:
            return self.channel.send(memoryview(plain)[:n])
        finally:
            self._give("plain", plain)

    def _seal_and_send(self, chunk: int, payload: bytes) -> None:
        plain, n = self._plaintext(chunk, payload)
        sealed = self._take("sealed", 4 + n + FRAME_OVERHEAD)
        try:
            size = self.channel.send_into(memoryview(plain)[:n], memoryview(sealed)[4:])
            sealed[:4] = size.to_bytes(4, "big")
            self._send_all(memoryview(sealed)[: 4 + size])
        finally:
            self._give("plain", plain)
            self._give("sealed", sealed)

    def _send_all(self, view: memoryview) -> None:
        assert self._raw is not None
        while view:
            try:
                sent = self._raw.send(view)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            view = view[sent:]

    def _read_and_open(self) -> tuple[Any, bool] | None:
        head = bytearray(4)
        if not self._recv_into(memoryview(head)):
            self.channel.end_of_stream()
            return None
        n = _frame_length(head, self.channel.max_frame)
        sealed = self._take("rx_sealed", n)
        try:
            if not self._recv_into(memoryview(sealed)[:n]):
                raise ChannelError("truncated", "stream ended after a frame header")
            return self._open(memoryview(sealed)[:n])
        finally:
            self._give("rx_sealed", sealed)

    def _open(self, body: bytes | memoryview) -> tuple[Any, bool]:
        """Decrypt a frame into the link's plaintext buffer and decode the message from
        there (a Chunk's payload is copied out, then checked against its digest)."""
        plain = self._take("rx_plain", len(body))
        try:
            got = self.channel.receive_frame_into(body, plain)
            if isinstance(got, Closed):
                return None, False  # the peer's final frame
            msg = wire.decode(memoryview(plain)[:got], expect=(Chunk, SealedChunk, End))
        finally:
            self._give("rx_plain", plain)
        if isinstance(msg, Chunk):
            return msg, chunk_digest(msg.payload) == msg.digest
        return msg, isinstance(msg, SealedChunk)  # authenticated by the channel

    def _recv_into(self, view: memoryview) -> bool:
        """Fill ``view`` from the socket; False at a clean end before its first byte."""
        assert self._raw is not None
        n = len(view)
        got = 0
        while got < n:
            try:
                k = self._raw.recv_into(view[got:])
            except BlockingIOError:
                self._wait(select.POLLIN)
                continue
            if k == 0:
                if got:
                    raise ChannelError("truncated", f"stream ended inside a frame ({got}/{n})")
                return False
            got += k
        return True

    def _wait(self, events: int) -> None:
        assert self._raw is not None
        poller = select.poll()
        poller.register(self._raw, events)
        while not poller.poll(POLL_MS):
            if self._closing:
                raise trio.ClosedResourceError("link closed")


def _frame_length(head: bytes | bytearray, limit: int) -> int:
    """The declared length of the frame whose 4-byte header is ``head``, refused when it
    exceeds ``limit`` (what the channel accepts next)."""
    n = int.from_bytes(head, "big")
    if n > limit:
        raise ChannelError("oversized", f"frame of {n} bytes, at most {limit} here")
    return n
