"""AMST over real loopback TCP with secure channels: a stream killed mid-way, a
corrupted chunk, a tampered frame, a transfer cut and resumed, the window bounding
memory, and which chunk format each pair of offers gets."""

from __future__ import annotations

import functools
import socket
import struct

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from mesh import versions, wire
from mesh.amst.receiver import Chunk, SealedChunk
from mesh.amst.sender import AmstSender
from mesh.runtime.amst_stream import Link
from mesh.runtime.amst_transfer import AmstServer, TransferCut, send_transfer
from tests.harness.channels import channels, handshake, pair
from tests.harness.data import MiB, chunked, real_bytes
from tests.harness.waiting import wait_until

TRANSFER = b"loopback-test-01"
#: Both ends offer sealed chunks, as two DCs' data channels of this version do.
SEALED = (1, 3, versions.AMST_SEALED)

#: Each test takes 1-15 s (the latter at load average 17 on 2 cores); the limit is for a
#: hang, not a speed bound. A trio test past it is cancelled cleanly before the alarm
#: (tests/harness/trio_deadline.py).
HANG = 120


def reset(sock: trio.SocketStream) -> None:
    """Cut the connection as a failing network does: no final frame, the peer sees the
    connection end (shutdown acts on the connection, whoever else holds its descriptor)."""
    sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.socket.shutdown(socket.SHUT_RDWR)


class Receiver:
    def __init__(self, offer_s: tuple[int, ...] = SEALED,
                 offer_t: tuple[int, ...] = SEALED) -> None:  # fmt: skip
        initiator, responder = channels(offer_s=offer_s, offer_t=offer_t)
        self.new_channel = initiator
        self.server = AmstServer(responder)
        self.got: dict[int, bytes] = {}
        self.accepted: list[trio.SocketStream] = []
        self.refuse_connections = False
        self.on_chunk = lambda n: None
        self.gate: trio.Event | None = None
        self.dialled: list[trio.SocketStream] = []
        self.server.expect(TRANSFER, self.sink)

    async def sink(self, chunk: int, payload: bytes) -> None:
        assert chunk not in self.got, f"chunk {chunk} delivered twice"
        self.got[chunk] = payload
        self.on_chunk(len(self.got))
        if self.gate is not None:
            await self.gate.wait()

    async def handler(self, sock: trio.SocketStream) -> None:
        self.accepted.append(sock)
        await self.server.handle_stream(sock)

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self.handler, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]

    async def connect(self) -> trio.SocketStream:
        if self.refuse_connections:
            raise OSError("connection refused (test)")
        sock = await trio.open_tcp_stream("127.0.0.1", self.port)
        self.dialled.append(sock)
        return sock


@pytest.mark.timeout(HANG)
async def test_stream_killed_mid_transfer_is_recovered_exactly_once() -> None:
    data = real_bytes(24 * MiB)
    rx = Receiver()
    core = AmstSender(TRANSFER, window_bytes=6 * MiB)
    gate = trio.Event()

    def hold(n: int) -> None:
        if n == 8:  # from the 8th chunk on, the receiver's sink holds every chunk
            rx.gate = gate

    async def kill_a_stream_when_the_window_is_full() -> None:
        await wait_until(lambda: core.room() <= MiB and len(core.up_streams()) >= 2,
                         "the window full (no room for one more chunk) on two streams")
        reset(rx.dialled[0])  # a stream dies holding chunks nobody acknowledged
        await wait_until(lambda: core.resent > 0, "the dead stream's chunks re-sent")
        gate.set()

    rx.on_chunk = hold
    async with trio.open_nursery() as nursery:
        await rx.serve(nursery)
        nursery.start_soon(kill_a_stream_when_the_window_is_full)
        report = await send_transfer(
            TRANSFER, chunked(data), connect=rx.connect, new_channel=rx.new_channel, core=core
        )
        receiver = await rx.server.wait_complete(TRANSFER)
        nursery.cancel_scope.cancel()
    assert b"".join(rx.got[i] for i in range(len(rx.got))) == data
    assert report.chunks == 24 and receiver.delivered == 24
    assert report.resent >= 1  # the killed stream's unacknowledged chunks went elsewhere
    assert report.streams_opened >= 3  # and a replacement stream was opened
    assert report.max_in_flight <= 6 * MiB  # backpressure held
    assert all(times <= 2 for _, times in report.sends)


@pytest.mark.timeout(HANG)
async def test_corrupted_chunk_is_refused_counted_and_resent(monkeypatch) -> None:
    """A peer without sealed chunks gets a SHA-256 per chunk, and a chunk whose payload
    changed after hashing is refused, counted and re-sent."""
    data = real_bytes(6 * MiB)
    rx = Receiver(offer_s=(1, 3), offer_t=(1, 3, versions.AMST_SEALED))
    message_of = Link._message
    corrupted: list[int] = []

    def corrupting_message(link: Link, chunk: int, payload: bytes) -> Chunk | SealedChunk:
        message = message_of(link, chunk, payload)
        assert type(message) is Chunk  # the sender does not offer sealed chunks
        if chunk == 3 and not corrupted:  # memory or bus error after hashing
            corrupted.append(3)
            bad = bytes([payload[0] ^ 1]) + payload[1:]
            message = Chunk(message.chunk, message.digest, bad)
        return message

    monkeypatch.setattr(Link, "_message", corrupting_message)
    async with trio.open_nursery() as nursery:
        await rx.serve(nursery)
        report = await send_transfer(
            TRANSFER, chunked(data), connect=rx.connect, new_channel=rx.new_channel
        )
        core = await rx.server.wait_complete(TRANSFER)
        nursery.cancel_scope.cancel()
    assert corrupted == [3]
    assert core.refused == 1 and report.refused == 1
    assert rx.got[3] == data[3 * MiB : 4 * MiB]
    assert b"".join(rx.got[i] for i in range(6)) == data


@pytest.mark.timeout(HANG)
@pytest.mark.parametrize(("offer_s", "offer_t", "kind"), [
    (SEALED, SEALED, SealedChunk),
    ((1, 3), SEALED, Chunk),
    (SEALED, (1, 3), Chunk),
    ((1, 3), (1, 3), Chunk),
])  # fmt: skip
async def test_chunks_are_sealed_only_when_both_ends_offer_it(
    offer_s: tuple[int, ...], offer_t: tuple[int, ...], kind: type, monkeypatch
) -> None:
    data = real_bytes(4 * MiB)
    rx = Receiver(offer_s, offer_t)
    message_of = Link._message
    kinds: set[type] = set()

    def recording(link: Link, chunk: int, payload: bytes) -> Chunk | SealedChunk:
        message = message_of(link, chunk, payload)
        kinds.add(type(message))
        return message

    monkeypatch.setattr(Link, "_message", recording)
    async with trio.open_nursery() as nursery:
        await rx.serve(nursery)
        report = await send_transfer(
            TRANSFER, chunked(data), connect=rx.connect, new_channel=rx.new_channel
        )
        core = await rx.server.wait_complete(TRANSFER)
        nursery.cancel_scope.cancel()
    assert kinds == {kind}
    assert core.delivered == 4 and report.refused == 0
    assert b"".join(rx.got[i] for i in range(4)) == data


@pytest.mark.timeout(HANG)
async def test_a_tampered_sealed_frame_ends_its_stream_and_its_chunk_is_resent(
    monkeypatch,
) -> None:
    """A sealed chunk has no digest: the channel's AEAD refuses a changed frame, the stream
    ends, and the chunk goes again on another stream, delivered intact."""
    data = real_bytes(6 * MiB)
    rx = Receiver()
    send_all = Link._send_all
    flipped: list[int] = []

    def flipping(link: Link, view: memoryview) -> None:
        if len(view) > MiB and not flipped:  # the first chunk frame, on the wire
            frame = bytearray(view)
            frame[len(frame) // 2] ^= 0x01
            flipped.append(len(frame))
            view = memoryview(frame)
        send_all(link, view)

    monkeypatch.setattr(Link, "_send_all", flipping)
    async with trio.open_nursery() as nursery:
        await rx.serve(nursery)
        report = await send_transfer(
            TRANSFER, chunked(data), connect=rx.connect, new_channel=rx.new_channel
        )
        core = await rx.server.wait_complete(TRANSFER)
        nursery.cancel_scope.cancel()
    assert len(flipped) == 1
    assert rx.server.notes.get("amst.stream_error", 0) >= 1  # the AEAD refused the frame
    assert core.refused == 0 and report.resent >= 1
    assert b"".join(rx.got[i] for i in range(6)) == data


@pytest.mark.timeout(HANG)
async def test_cut_transfer_resumes_without_resending_acknowledged_chunks() -> None:
    data = real_bytes(16 * MiB)
    rx = Receiver()

    def cut_everything(n: int) -> None:
        if n == 6:
            rx.refuse_connections = True
            for sock in rx.accepted:
                reset(sock)

    rx.on_chunk = cut_everything
    async with trio.open_nursery() as nursery:
        await rx.serve(nursery)
        first = AmstSender(TRANSFER, max_failures=2)
        with pytest.raises(TransferCut, match="cut"):
            await send_transfer(
                TRANSFER,
                chunked(data),
                connect=rx.connect,
                new_channel=rx.new_channel,
                core=first,
            )
        held = set(rx.got)
        assert 6 <= len(held) < 16
        rx.refuse_connections = False
        rx.on_chunk = lambda n: None
        again = await send_transfer(
            TRANSFER, chunked(data), connect=rx.connect, new_channel=rx.new_channel
        )
        await rx.server.wait_complete(TRANSFER)
        nursery.cancel_scope.cancel()
    resent = {chunk for chunk, _ in again.sends}
    assert not resent & held  # nothing the receiver had acknowledged was sent again
    assert all(times == 1 for _, times in again.sends)
    # (a chunk the receiver was still decoding at the cut counts as held by the resume)
    assert sorted(rx.got) == list(range(16)) and len(resent) <= 16 - len(held)
    assert b"".join(rx.got[i] for i in range(16)) == data


@pytest.mark.timeout(HANG)
async def test_streams_of_an_unknown_transfer_are_refused() -> None:
    rx = Receiver()
    async with trio.open_nursery() as nursery:
        await rx.serve(nursery)
        with pytest.raises(TransferCut, match="cut"):
            await send_transfer(
                b"not-expected-xx!",
                chunked(real_bytes(MiB)),
                connect=rx.connect,
                new_channel=rx.new_channel,
                core=AmstSender(b"not-expected-xx!", max_failures=2),
            )
        nursery.cancel_scope.cancel()
    assert rx.server.notes["amst.unknown_transfer"] >= 2
    assert not rx.got


@pytest.mark.timeout(HANG)
async def test_transfer_over_streams_that_are_not_sockets() -> None:
    """Bulk frames fall back to trio I/O (crypto still in workers) on any trio stream."""
    data = real_bytes(5 * MiB)
    rx = Receiver()
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(rx.server.handle_stream, theirs)
            return ours

        report = await send_transfer(
            TRANSFER, chunked(data), connect=connect, new_channel=rx.new_channel
        )
        await rx.server.wait_complete(TRANSFER)
    assert report.chunks == 5
    assert b"".join(rx.got[i] for i in range(5)) == data


def _open_links() -> tuple[object, Link]:
    """An open channel pair: the sending channel, and a Link on the receiving one (its
    stream is never touched: frames go straight to the bulk decoder)."""
    a, b = pair(versions_a=SEALED, versions_b=SEALED)
    handshake(a, b)
    return a, Link(trio.testing.MemorySendStream(), b)  # type: ignore[arg-type]


@given(st.data())
def test_authenticated_garbage_on_the_bulk_path_gives_only_wire_or_channel_errors(
    data: st.DataObject,
) -> None:
    """A peer that passed the handshake may still send anything: a bulk frame whose
    plaintext is a mutated chunk (or any bytes) is refused with WireError, never another
    exception, and a valid one decodes from the link's reused buffer intact."""
    a, link = _open_links()
    size = data.draw(st.sampled_from([0, 100, 65535, 65536, 70000]))
    chunk = data.draw(st.integers(0, 2**63 - 1))
    payload = bytes([chunk % 251]) * size
    frame = bytearray(wire.encode(data.draw(st.sampled_from([SealedChunk(chunk, payload),
                                                          Chunk(chunk, bytes(32), payload)]))))
    for _ in range(data.draw(st.integers(0, 3))):
        pos = data.draw(st.integers(0, min(max(0, len(frame) - 1), 48)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and frame:
            frame[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del frame[pos:]
        else:
            frame[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
    sealed = a.send(bytes(frame))  # type: ignore[attr-defined]
    try:
        msg, _valid = link._open(sealed)
    except wire.WireError:
        return
    assert type(msg) in (SealedChunk, Chunk)
    assert wire.encode(msg) == bytes(frame)  # canonical: only the frame that was sent
