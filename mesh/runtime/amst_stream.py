"""One AMST stream: a TCP connection carrying one secure channel, with length-prefixed
frames (the :func:`mesh.channel.frame` layout: 4-byte big-endian length, then the frame).

Small frames (the handshake, Open, Ack, End) go through trio on the event loop.
Bulk frames are read and written by worker threads: a worker encodes, encrypts and
writes a whole chunk frame, or reads, decrypts, decodes and hashes one, so the
kernel's copying and the crypto of all streams run on all cores while the event
loop only schedules. The workers use a duplicate of the socket's descriptor, in
non-blocking mode like trio's own, waiting with ``poll``; closing the link shuts the
connection down, which wakes them.

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

from mesh import wire
from mesh.amst.receiver import Chunk, End, chunk_digest
from mesh.channel import ChannelError, Closed, Data, SecureChannel

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

    async def send_chunk(self, message: Chunk) -> None:
        async with self.send_lock:
            if self._bulk_socket() is not None:
                await self._in_worker(self._seal_and_send, message)
            else:  # not a socket (a test stream, a wrapper): seal in a worker, write here
                data = await trio.to_thread.run_sync(self._seal, message)
                await self.sock.send_all(len(data).to_bytes(4, "big") + data)

    async def receive_bulk(self) -> tuple[Any, bool] | None:
        """The next frame, decrypted, decoded and (a Chunk) checked against its digest:
        ``(message, digest_ok)``; ``(None, False)`` for the peer's final frame; None at EOF."""
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

    def _seal(self, message: Chunk) -> bytes:
        return self.channel.send(wire.encode(message))

    def _seal_and_send(self, message: Chunk) -> None:
        assert self._raw is not None
        data = self._seal(message)
        parts = [memoryview(len(data).to_bytes(4, "big")), memoryview(data)]
        while parts:
            try:
                sent = self._raw.sendmsg(parts)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            while sent and parts:
                if sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                else:
                    parts[0] = parts[0][sent:]
                    sent = 0

    def _read_and_open(self) -> tuple[Any, bool] | None:
        head = self._recv_exactly(4)
        if head is None:
            self.channel.end_of_stream()
            return None
        body = self._recv_exactly(_frame_length(head, self.channel.max_frame))
        if body is None:
            raise ChannelError("truncated", "stream ended after a frame header")
        return self._open(body)

    def _open(self, body: bytes) -> tuple[Any, bool]:
        for event in self.channel.receive_frame(body):
            if isinstance(event, Data):
                msg = wire.decode(event.payload, expect=(Chunk, End))
                valid = isinstance(msg, Chunk) and chunk_digest(msg.payload) == msg.digest
                return msg, valid
        return None, False  # the peer's final frame

    def _recv_exactly(self, n: int) -> bytes | None:
        assert self._raw is not None
        buf = bytearray(n)
        view = memoryview(buf)
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
                return None
            got += k
        return bytes(buf)

    def _wait(self, events: int) -> None:
        assert self._raw is not None
        poller = select.poll()
        poller.register(self._raw, events)
        while not poller.poll(POLL_MS):
            if self._closing:
                raise trio.ClosedResourceError("link closed")


def _frame_length(head: bytes, limit: int) -> int:
    """The declared length of the frame whose 4-byte header is ``head``, refused when it
    exceeds ``limit`` (what the channel accepts next)."""
    n = int.from_bytes(head, "big")
    if n > limit:
        raise ChannelError("oversized", f"frame of {n} bytes, at most {limit} here")
    return n
