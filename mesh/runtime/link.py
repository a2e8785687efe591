"""One authenticated control connection: a trio-websocket connection carrying a
:class:`mesh.channel.SecureChannel`, one websocket message per channel frame, or, when
both ends offer :data:`mesh.versions.CONTROL_FRAMES`, after the link hellos the
channel's frames length-prefixed straight on the TCP stream (the switch point, limits
and keepalive: :mod:`mesh.runtime.link_stream`).

:func:`open_link` runs the channel handshake and then exchanges
:class:`LinkHello` (the sender's *incarnation*, random per process start, which
the duplicate-link tie-break uses to tell a restarted peer from a simultaneous
dial). :meth:`Link.run` then carries data until either side closes:

* ``retire()`` closes the outbox; the writer sends what is queued, then the
  channel's final frame, and waits (at most ``DRAIN_TIMEOUT``) for the peer's
  final frame, delivering what still arrives;
* a final frame from the peer retires our side in turn, so a close is always
  final frame for final frame, and the peer can tell it from a crash;
* a connection that loses the duplicate tie-break is retired with
  :class:`LinkSuperseded` before its final frame, so the far end waits for the
  winning connection instead of reporting the peer down and up again;
* a websocket ping every ``KEEPALIVE_INTERVAL`` must be answered within
  ``KEEPALIVE_TIMEOUT``, so a peer that vanished without a FIN (power loss,
  partition) is noticed and redialled; a framed link sends :class:`LinkHeartbeat`
  when it has been silent and ends after ``IDLE_TIMEOUT`` without a frame instead.

Messages queued together leave together: the writer takes every message already
waiting in the outbox (up to ``BUNDLE_MESSAGES`` and ``BUNDLE_BYTES``) and sends
them as one :class:`LinkBundle` in one channel frame, so a burst costs one
websocket message, one encryption and one socket write instead of one each
(the coalescing of Nagle's algorithm, RFC 896, without its wait: a message
alone in the outbox goes out at once, unwrapped). The receiver unpacks a
bundle and handles its messages in order, as if they had come one by one.

Sends from a core's turn are written there when the link is quiet: the runtime
holds a group's messages (:meth:`Link.hold`), then releases them; if the writer
task is parked on an empty outbox and nothing is being written on the socket, the
release frames them (the same bundles), encrypts them and writes them to the
socket at once with a write that never waits (:class:`DirectStream`); what the kernel
does not take now goes out first in the next write of the stream, which the writer is
woken to make. That spares, per burst, the writer's wake-up, trio-websocket's lock
and the socket send's checkpoint (``python -m bench.loop_passes``, one message bounced:
6 -> 3 task steps and 4 -> 2 event-loop passes per message). Otherwise the messages go
through the outbox as before.

Any channel fault ends the link with the :class:`ChannelError` reason.

Before the channel is open the peer is unauthenticated, and the websocket buffers only
what the channel accepts next (:func:`bound_messages`): a message longer than the
handshake frame expected (a Hello: 1 KiB) closes the connection with 1009 as soon as
its bytes pass the limit, and the socket is read 4 KiB at a time.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage
from wsproto.utilities import LocalProtocolError

from mesh import versions, wire
from mesh.channel import ChannelError, Closed, Data, SecureChannel
from mesh.runtime.link_policy import LinkClaim
from mesh.runtime.link_stream import (
    HEARTBEAT_INTERVAL,
    IDLE_TIMEOUT,
    KEEPALIVE_TICK,
    RECEIVE_BYTES,
    DirectStream,
    install,
    prefixed,
    sealed,
)
from mesh.wire import Bytes, ListOf, field

__all__ = [
    "Link",
    "LinkBundle",
    "BUNDLE_MESSAGES",
    "BUNDLE_BYTES",
    "LinkHello",
    "LinkSuperseded",
    "LinkFramed",
    "LinkHeartbeat",
    "open_link",
    "new_incarnation",
    "INCARNATION_BYTES",
    "RECEIVE_BYTES",
    "HANDSHAKE_READ_BYTES",
    "bound_messages",
    "DirectStream",
]

INCARNATION_BYTES = 16
#: Control messages queued for one peer before further sends are dropped (and
#: counted). 1024 messages of at most 64 KiB bound a stalled peer's backlog to
#: 64 MiB; cores never block on a slow peer, they see the drop as message loss,
#: which every protocol above (gossip, PBFT retransmission) already tolerates.
OUTBOX_MESSAGES = 1024
#: How long a retiring link waits for the peer's final frame. A peer answers as
#: soon as its reader sees ours (one RTT); 5 s covers a loaded machine.
DRAIN_TIMEOUT = 5.0
#: Keepalive: a ping every 2.5 s that must be answered within 5 s notices a dead
#: peer within 7.5 s, inside issue 2's 10 s reconnect bound.
KEEPALIVE_INTERVAL = 2.5
KEEPALIVE_TIMEOUT = 5.0


#: Most messages coalesced into one frame: a PBFT burst (a batch's votes and the
#: requests of one client window, 64 by default) fits with room.
BUNDLE_MESSAGES = 256
#: Most message bytes coalesced into one frame. 256 KiB keeps one frame's
#: encryption and send under a millisecond, so a bundle never holds up the link
#: noticeably; a larger message goes alone.
BUNDLE_BYTES = 256 * 1024


#: ... and before the channel is open: trio-websocket's own default, 4 KiB, which holds
#: the HTTP upgrade and any handshake frame (at most 2 KiB), so an unauthenticated peer
#: makes the node hold at most this much beyond the frame limit.
HANDSHAKE_READ_BYTES = 4096


def bound_messages(ws: WebSocketConnection, channel: SecureChannel) -> None:
    """Make ``ws`` buffer no message longer than the frame ``channel`` accepts next, and
    read the socket in handshake-sized pieces until the channel is open.

    trio-websocket (0.12.2) takes both bounds only as constructor arguments; they live in
    ``_max_message_size`` (checked in ``_handle_message_event`` as each fragment arrives,
    closing with 1009 past it) and ``_receive_buffer_size`` (the read size of
    ``_reader_task``). ``tests/test_hostile_handshake.py`` pins both names, so an upgrade
    that renames them fails a test instead of silently lifting the bound."""
    ws._max_message_size = max(channel.max_frame, 1)
    ws._receive_buffer_size = RECEIVE_BYTES if channel.is_open else HANDSHAKE_READ_BYTES


def new_incarnation() -> bytes:
    return os.urandom(INCARNATION_BYTES)


@wire.message("runtime.link-hello", max_size=128)
class LinkHello:
    """First data message in each direction of a control connection."""

    incarnation: bytes = field(Bytes(INCARNATION_BYTES, exact=True))


@wire.message("runtime.bundle", max_size=BUNDLE_BYTES + 9 * BUNDLE_MESSAGES + 64)
class LinkBundle:
    """Several messages sent as one frame; each is a complete encoded message (never
    itself a bundle)."""

    messages: tuple[bytes, ...] = field(ListOf(Bytes(BUNDLE_BYTES), BUNDLE_MESSAGES))


@wire.message("runtime.link-superseded", max_size=64)
class LinkSuperseded:
    """Sent just before the final frame of a connection that lost the tie-break: the
    peer keeps the peer "up" until the winning connection reaches it too, instead of
    reporting a PeerDown and a PeerUp a moment later."""


@wire.message("runtime.link-framed", max_size=64)
class LinkFramed:
    """The initiator's first frame on a framed link (:mod:`mesh.runtime.link_stream`):
    its websocket reader has stopped, the responder may write frames."""


@wire.message("runtime.link-heartbeat", max_size=64)
class LinkHeartbeat:
    """Sent on a framed link that has sent nothing for a while, so the peer's idle
    timeout tells a quiet link from a dead one (what websocket pings did)."""


async def _send_frames(ws: WebSocketConnection, channel: SecureChannel) -> None:
    for data in channel.frames_to_send():
        await ws.send_message(data)


async def _next_frame(ws: WebSocketConnection) -> bytes:
    message = await ws.get_message()
    if not isinstance(message, bytes):
        raise ChannelError("malformed", "a text websocket message on a control connection")
    return message


async def open_link(
    ws: WebSocketConnection, channel: SecureChannel, incarnation: bytes
) -> tuple[str, bytes]:
    """Handshake on ``ws``; returns (peer name, peer incarnation). The transfer versions
    (the common highest and the peer's offer) are on ``channel``. When both ends offer
    :data:`mesh.versions.CONTROL_FRAMES`, the connection leaves here switched to frames
    on the TCP stream (the switch point: :mod:`mesh.runtime.link_stream`).

    Raises :class:`ChannelError` for a refused channel and ``ConnectionClosed``
    if the websocket goes away; the caller bounds the time.
    """
    direct = install(ws)
    await _send_frames(ws, channel)
    while not channel.is_open:
        bound_messages(ws, channel)
        channel.receive_frame(await _next_frame(ws))
        await _send_frames(ws, channel)
    bound_messages(ws, channel)
    framed = direct is not None and versions.both_offer(
        versions.CONTROL_FRAMES, channel.versions, channel.peer_versions)
    mine = channel.send(wire.encode(LinkHello(incarnation)))
    if not framed:
        if direct is not None:
            direct.websocket_reads_only()
        await ws.send_message(mine)
        hello = await _receive_hello(channel, await _next_frame(ws))
    elif channel.initiator:
        assert direct is not None
        await ws.send_message(mine)
        hello = await _receive_hello(channel, await _next_frame(ws))
        await direct.stop_websocket_reader(ws, channel.max_frame)
        await direct.send_all(prefixed(channel.send(wire.encode(LinkFramed()))))
    else:
        assert direct is not None
        hello = await _receive_hello(channel, await _next_frame(ws))
        await direct.stop_websocket_reader(ws, channel.max_frame)
        await ws.send_message(mine)
        await _receive_framed(direct, channel)
    assert channel.peer is not None
    return channel.peer, hello.incarnation


async def _receive_hello(channel: SecureChannel, frame: bytes) -> LinkHello:
    events = channel.receive_frame(frame)
    if len(events) != 1 or not isinstance(events[0], Data):
        raise ChannelError("malformed", "the peer closed before its link hello")
    try:
        hello: LinkHello = wire.decode(events[0].payload, expect=(LinkHello,))
    except wire.WireError as exc:
        raise ChannelError("malformed", f"expected a link hello: {exc}") from exc
    return hello


async def _receive_framed(direct: DirectStream, channel: SecureChannel) -> None:
    """The responder's wait for the initiator's first frame, :class:`LinkFramed`; frames
    read with it stay in the reader for the link."""
    assert direct.frames is not None
    frames = await direct.receive_frames()
    if not frames:
        raise ConnectionClosed(None)
    first = channel.receive_frame(frames[0])
    if len(first) != 1 or not isinstance(first[0], Data):
        raise ChannelError("malformed", "the peer closed before framing")
    try:
        wire.decode(first[0].payload, expect=(LinkFramed,))
    except wire.WireError as exc:
        raise ChannelError("malformed", f"expected the first frame of a framed link: {exc}") \
            from exc
    direct.unread(frames[1:])


class Link:
    """An open control connection to ``peer``. Send with :meth:`enqueue`."""

    def __init__(
        self,
        *,
        link_id: int,
        ws: WebSocketConnection,
        channel: SecureChannel,
        peer: str,
        initiator: str,
        peer_incarnation: bytes,
    ) -> None:
        self.link_id = link_id
        self.ws = ws
        self.channel = channel
        self.peer = peer
        self.claim = LinkClaim(initiator, peer_incarnation)
        self.retiring = False
        #: The peer said another connection replaces this one (:class:`LinkSuperseded`).
        self.superseded = False
        #: How the link ended: "clean" for final frame for final frame, else a
        #: ChannelError reason, "keepalive_timeout" or "connection_lost".
        self.end_reason: str | None = None
        self.end_detail = ""
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](OUTBOX_MESSAGES)
        #: messages of the group being sent (:meth:`hold`), until :meth:`release`
        self._held: list[bytes] = []
        #: The writer task waits on an empty outbox with nothing in hand; cleared by
        #: whoever puts a message in the outbox (the writer may have been handed it
        #: without having run yet).
        self._parked = False
        #: messages in the outbox (its statistics() builds an object per call)
        self._outbox_len = 0
        #: frames written from a turn (:meth:`release`), and how many of them the
        #: kernel did not take at once
        self.direct_frames = 0
        self.direct_partial = 0
        #: ... and the writes from a turn the socket failed (the link then ends)
        self.direct_failed = 0
        self._direct: DirectStream | None = install(ws)
        #: frames on the TCP stream rather than websocket messages (link_stream)
        self.framed = self._direct is not None and self._direct.framed
        #: frames this end sent, for the framed keepalive
        self.frames_out = 0
        self._reader_done = trio.Event()
        self._writer_done = trio.Event()
        self._cancel: trio.CancelScope | None = None

    @property
    def version(self) -> int:
        """The highest transfer version both ends offered (:mod:`mesh.versions`)."""
        assert self.channel.version is not None, "a link carries an open channel"
        return self.channel.version

    @property
    def peer_versions(self) -> tuple[int, ...]:
        """The peer's whole offer of transfer versions, as it signed it in the handshake."""
        return self.channel.peer_versions

    def enqueue(self, payload: bytes) -> bool:
        """Queue one plaintext message; False when the link is retiring or its outbox is full."""
        self._parked = False
        try:
            self._out_send.send_nowait(payload)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        self._outbox_len += 1
        return True

    def hold(self, payload: bytes) -> bool:
        """Take one plaintext message of a group; it leaves at :meth:`release`. False
        (the message is dropped) when the link is retiring or its outbox would be full."""
        if self.retiring:
            return False
        if len(self._held) + self._outbox_len >= OUTBOX_MESSAGES:
            return False
        self._held.append(payload)
        return True

    def release(self) -> int:
        """Send the held messages: written now when the link is quiet (see the module
        docstring), else queued for the writer. Returns how many were dropped (the
        outbox filled meanwhile, or the link began to retire)."""
        held, self._held = self._held, []
        start = 0
        if held and self._quiet():
            start = self._write_now(held)
        dropped = 0
        for payload in held[start:]:
            if not self.enqueue(payload):
                dropped += 1
        return dropped

    def _quiet(self) -> bool:
        """Nothing of ours is queued, in the writer's hands or on its way to the
        socket, and the websocket is open: a frame written now is in order."""
        return (self._parked and self._direct is not None and self._direct.writable_now
                and not self.retiring and self.channel.is_open
                and (self.framed or self.ws._wsproto.state == ConnectionState.OPEN)
                and self._outbox_len == 0)

    def _write_now(self, held: list[bytes]) -> int:
        """Frame, encrypt and write ``held`` burst by burst while the socket takes it;
        returns how many were written (the rest go through the outbox, in order)."""
        assert self._direct is not None
        done = 0
        while done < len(held):
            burst, taken = _burst_of(held, done)
            try:
                data = (sealed(self.channel, _frame_of(burst)) if self.framed
                        else self.ws._wsproto.send(
                            BytesMessage(data=self.channel.send(_frame_of(burst)))))
            except (ChannelError, LocalProtocolError):
                data = None
            if data is None or not self._direct.try_write(data):
                # The channel or the socket failed (the peer reset it, ...): nothing was
                # written, and the link is ending. The rest go to the writer, which meets
                # the same failure and ends the link; never the turn's task, which
                # delivers for the node.
                self.direct_failed += 1
                break
            done += taken
            self.direct_frames += 1
            self.frames_out += 1
            if self._direct.pending:
                # The kernel took part: the writer writes the rest before anything
                # else (the wake-up below, then what follows it in the outbox).
                self.direct_partial += 1
                self.enqueue(b"")
                break
        return done

    def retire(self, *, superseded: bool = False) -> None:
        """Close gracefully: flush the outbox, send the final frame, drain the peer's.
        ``superseded``: another connection to the same peer process replaces this one."""
        if not self.retiring:
            if superseded:
                self.enqueue(wire.encode(LinkSuperseded()))
            self.retiring = True
            self._out_send.close()

    async def run(self, on_payload: Callable[[bytes], Awaitable[None]]) -> None:
        """Carry data until the link ends; ``end_reason`` says how. Never raises for
        anything the peer or the network does."""
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            if self.framed:
                nursery.start_soon(self._framed_reader, on_payload)
                nursery.start_soon(self._heartbeat)
            else:
                nursery.start_soon(self._reader, on_payload)
                nursery.start_soon(self._keepalive)
            nursery.start_soon(self._writer)

    def _end(self, reason: str, detail: str = "") -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.end_detail = detail
        assert self._cancel is not None
        self._cancel.cancel()

    async def _reader(self, on_payload: Callable[[bytes], Awaitable[None]]) -> None:
        try:
            while True:
                try:
                    frame = await _next_frame(self.ws)
                except ConnectionClosed:
                    self.channel.end_of_stream()  # raises "truncated" unless the peer closed
                    return
                if await self._deliver_frame(frame, on_payload):
                    return
        except ChannelError as exc:
            self._end(exc.reason, exc.detail)

    async def _deliver_frame(self, frame: bytes,
                             on_payload: Callable[[bytes], Awaitable[None]]) -> bool:
        """A received frame's messages to ``on_payload``; True once it closed the link."""
        for event in self.channel.receive_frame(frame):
            if isinstance(event, Data):
                await on_payload(event.payload)
            elif isinstance(event, Closed):
                self._reader_done.set()
                self.retire()
                return True
        return False

    async def _framed_reader(self, on_payload: Callable[[bytes], Awaitable[None]]) -> None:
        """The reader of a framed link: frames straight from the socket."""
        assert self._direct is not None
        receive_frames = self._direct.receive_frames
        try:
            while True:
                frames = await receive_frames()
                if not frames:
                    self.channel.end_of_stream()  # raises "truncated" unless the peer closed
                    return
                for frame in frames:
                    if await self._deliver_frame(frame, on_payload):
                        return
        except ChannelError as exc:
            self._end(exc.reason, exc.detail)

    def _take_burst(self, first: bytes) -> tuple[bytes, bytes | None]:
        """``first`` and what waits behind it, as one frame's plaintext; and the
        message that did not fit, if one was taken out of the outbox."""
        burst = [first]
        size = len(first)
        while len(burst) < BUNDLE_MESSAGES and size < BUNDLE_BYTES:
            try:
                more = self._out_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._outbox_len -= 1
            if not more:  # a wake-up for pending bytes: this frame's send writes them first
                continue
            if size + len(more) > BUNDLE_BYTES:
                return _frame_of(burst), more
            burst.append(more)
            size += len(more)
        return _frame_of(burst), None

    async def _writer(self) -> None:
        try:
            carry: bytes | None = None
            while True:
                if carry is None:
                    self._parked = self._outbox_len == 0
                    try:
                        carry = await self._out_recv.receive()
                    except trio.EndOfChannel:
                        break
                    finally:
                        self._parked = False
                    self._outbox_len -= 1
                if not carry:  # the wake-up after a write the kernel took only part of
                    carry = None
                    assert self._direct is not None
                    try:
                        await self._direct.flush()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        raise ConnectionClosed(None) from None
                    continue
                plaintext, carry = self._take_burst(carry)
                if self.framed:
                    await self._send_prefixed(sealed(self.channel, plaintext))
                else:
                    await self._send_frame(self.channel.send(plaintext))
            await self._send_frame(self.channel.close())
        except ConnectionClosed:
            self._end("connection_lost", "the websocket closed while sending")
            return
        except ChannelError as exc:
            self._end(exc.reason, exc.detail)
            return
        with trio.move_on_after(DRAIN_TIMEOUT):
            await self._reader_done.wait()
        if self._reader_done.is_set():
            self._end("clean")
        else:
            self._end("truncated", f"no final frame within {DRAIN_TIMEOUT} s of ours")

    async def _send_frame(self, frame: bytes) -> None:
        if not self.framed:
            self.frames_out += 1
            await self.ws.send_message(frame)
            return
        await self._send_prefixed(prefixed(frame))

    async def _send_prefixed(self, data: bytes | bytearray) -> None:
        self.frames_out += 1
        assert self._direct is not None
        try:
            await self._direct.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(None) from None

    async def _heartbeat(self) -> None:
        """The keepalive of a framed link (:mod:`mesh.runtime.link_stream`): a heartbeat
        after HEARTBEAT_INTERVAL without a frame sent, the end after IDLE_TIMEOUT without
        a byte received. Counters, not clocks, on the message path."""
        assert self._direct is not None
        direct = self._direct
        send_after = round(HEARTBEAT_INTERVAL / KEEPALIVE_TICK)
        idle_after = round(IDLE_TIMEOUT / KEEPALIVE_TICK)
        quiet_out = quiet_in = 0
        seen_out, seen_in = self.frames_out, direct.reads
        while True:
            await trio.sleep(KEEPALIVE_TICK)
            quiet_out = quiet_out + 1 if self.frames_out == seen_out else 0
            quiet_in = quiet_in + 1 if direct.reads == seen_in else 0
            seen_out, seen_in = self.frames_out, direct.reads
            if quiet_in >= idle_after:
                self._end("keepalive_timeout", f"nothing received for {IDLE_TIMEOUT} s")
                return
            if quiet_out >= send_after and not self.retiring:
                self.enqueue(_HEARTBEAT)
                quiet_out = 0

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE_INTERVAL)
            if self.retiring:
                # No ping after our final frame: the peer closes its websocket once it has
                # answered that frame, and trio-websocket, receiving a ping on a closing
                # connection, tries to pong and raises (issue #184, node_runtime's
                # ws_protocol_error). The drain's own timeout covers a silent peer.
                return
            with trio.move_on_after(KEEPALIVE_TIMEOUT) as scope:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    # The reader sees the same closure and says whether it was clean.
                    return
            if scope.cancelled_caught:
                self._end("keepalive_timeout", f"no pong within {KEEPALIVE_TIMEOUT} s")
                return


_HEARTBEAT = wire.encode(LinkHeartbeat())


def _burst_of(messages: list[bytes], start: int) -> tuple[list[bytes], int]:
    """The messages from ``start`` that make one frame, under the writer's bounds."""
    burst = [messages[start]]
    size = len(burst[0])
    for more in messages[start + 1:]:
        if len(burst) >= BUNDLE_MESSAGES or size + len(more) > BUNDLE_BYTES:
            break
        burst.append(more)
        size += len(more)
    return burst, len(burst)


def _frame_of(burst: list[bytes]) -> bytes:
    """A message alone goes unwrapped (also one too large for a bundle)."""
    return burst[0] if len(burst) == 1 else wire.encode(LinkBundle(tuple(burst)))
