"""Sends written from a core's turn (mesh.runtime.link: Link.release, DirectStream): a
quiet link's frames leave without the writer task, every byte in order even when the
kernel takes only part of a write, and trio-websocket's own sends (pings, pongs, the
close) queue behind what is pending."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mesh import wire
from mesh.core import Action, Event, PeerUp, Received, Send
from mesh.runtime.link import DirectStream, Link
from mesh.runtime.node_runtime import Runtime
from mesh.wire import U64, Bytes, field
from tests.harness.runtime import Mesh
from tests.harness.waiting import wait_until


@wire.message("test.direct-blob", max_size=70_000)
class Blob:
    seq: int = field(U64())
    data: bytes = field(Bytes(65_536))


def _stream_pair() -> tuple[trio.SocketStream, socket.socket]:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    b.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), b


async def _read_all(sock: socket.socket, want: int) -> bytes:
    got = bytearray()
    while len(got) < want:
        await trio.lowlevel.wait_readable(sock)
        got += sock.recv(1 << 16)
    return bytes(got)


async def test_what_the_kernel_does_not_take_goes_first_in_the_next_send() -> None:
    inner, far = _stream_pair()
    stream = DirectStream(inner)
    first = bytes(range(256)) * 2000  # 512 KB: far more than the socket buffers hold
    assert stream.try_write(first)
    assert stream.pending  # the kernel took only part
    assert not stream.try_write(b"never")  # refused while bytes are pending
    tail = b"tail" * 1000
    got = b""

    async def read() -> None:
        nonlocal got
        got = await _read_all(far, len(first) + len(tail))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await stream.send_all(tail)  # trio-websocket's own send: the pending bytes first
    assert got == first + tail
    assert not stream.pending and stream.writable_now
    far.close()
    await stream.aclose()  # the wrapped stream's own methods pass through


async def test_a_write_is_refused_while_a_send_is_under_way() -> None:
    inner, far = _stream_pair()
    stream = DirectStream(inner)
    big = b"x" * 600_000
    seen: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, big)
        await trio.testing.wait_all_tasks_blocked()  # the send waits for the socket
        seen.append(stream.try_write(b"y"))
        got = await _read_all(far, len(big))
    assert seen == [False] and got == big
    far.close()
    await stream.aclose()


async def test_a_flush_and_another_send_take_turns_in_order() -> None:
    inner, far = _stream_pair()
    stream = DirectStream(inner)
    first = b"a" * 300_000
    assert stream.try_write(first) and stream.pending
    pong = b"p" * 100
    got = b""

    async def read() -> None:
        nonlocal got
        got = await _read_all(far, len(first) + len(pong))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.flush)  # the link writer, woken for the pending bytes
        await trio.testing.wait_all_tasks_blocked()  # it waits for the socket
        nursery.start_soon(stream.send_all, pong)  # trio-websocket answering a ping
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
    assert got == first + pong
    far.close()
    await stream.aclose()


class _Sink:
    """Records the sequence numbers of the blobs it receives; knows when its peer is up."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.up = False

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, PeerUp):
            self.up = True
        if isinstance(event, Received) and isinstance(event.message, Blob):
            self.seqs.append(event.message.seq)
        return []


def _link(rt: Runtime, peer: str) -> Link:
    link = rt._peers.link(peer)
    assert link is not None
    return link


@pytest.mark.parametrize("framed", [True, False], ids=["frames", "websocket"])
async def test_a_quiet_link_writes_a_turns_sends_itself_in_order(
    tmp_path: Path, framed: bool
) -> None:
    mesh = Mesh(2, tmp_path)
    rts = {n: mesh.runtime(n, framed=framed) for n in mesh.names}
    sinks = {n: _Sink() for n in mesh.names}
    for n, rt in rts.items():
        rt.add_core("blob", sinks[n], ("test.",))
    async with trio.open_nursery() as nursery:
        for rt in rts.values():
            await nursery.start(rt.run)
        await wait_until(lambda: all(s.up for s in sinks.values()), "both links up")
        link = _link(rts["dc1"], "dc2")
        assert link.framed is framed
        # trio-websocket 0.12.2's private names the link relies on: its stream (replaced
        # by the DirectStream) and its wsproto connection (which frames the message)
        assert isinstance(link.ws._stream, DirectStream)
        assert link.ws._wsproto is not None
        # A small send buffer, so the kernel takes part of a group's write (the receive
        # buffer is left alone: shrinking it under an open window makes TCP drop data).
        link.ws._stream._inner.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sent = 0

        def blast(count: int, size: int) -> Any:
            def fn(core: Any, now: float) -> list[Action]:
                nonlocal sent
                out: list[Action] = [Send("dc2", Blob(sent + i, bytes([i % 251]) * size))
                                     for i in range(count)]
                sent += count
                return out
            return fn

        def quiet() -> bool:  # nothing of ours queued or being sent (a keepalive ping
            assert link._direct is not None  # may be): a turn's sends go out directly
            return link._parked and link._direct.writable_now

        # wait_until returns right after its check holds, and an idle core runs the
        # invocation in this task before any other task runs: the link is still quiet
        await wait_until(quiet, "the writer parked")
        await rts["dc1"].invoke("blob", blast(1, 10), "one small message")
        await wait_until(lambda: sinks["dc2"].seqs == [0], "the first message")
        assert rts["dc1"].counters.get("frames_direct", 0) == 1  # written from the turn
        for _ in range(5):  # groups larger than the socket buffers: partial writes
            await wait_until(quiet, "the writer parked")
            await rts["dc1"].invoke("blob", blast(12, 60_000), "a burst")
            assert link.direct_partial > 0  # the kernel took part of the first frame
            # ... and what follows at once queues behind the pending bytes, in order
            await rts["dc1"].invoke("blob", blast(3, 100), "a small one behind it")
        await wait_until(lambda: len(sinks["dc2"].seqs) == sent, "every message")
        assert sinks["dc2"].seqs == list(range(sent))
        assert link.direct_partial > 0
        assert rts["dc1"].counters.get("send_dropped", 0) == 0
        if not framed:
            await link.ws.ping()  # trio-websocket's own send still works after them
        for rt in rts.values():
            rt.shutdown()
    for n in mesh.names:
        closed = [e for e in mesh.events(n) if e["event"] == "link_closed"]
        assert closed and all(e["reason"] == "clean" for e in closed), closed


async def test_a_write_to_a_failed_socket_is_refused_not_raised() -> None:
    inner, far = _stream_pair()
    stream = DirectStream(inner)
    far.close()
    refused = False
    for _ in range(4):  # the first write may still land in the buffer before the reset
        refused = refused or not stream.try_write(b"z" * 1000)
    assert refused and not stream.pending
    await stream.aclose()


async def test_a_failed_direct_write_ends_the_link_not_the_node(tmp_path: Path) -> None:
    mesh = Mesh(2, tmp_path)
    rts = {n: mesh.runtime(n) for n in mesh.names}
    sinks = {n: _Sink() for n in mesh.names}
    for n, rt in rts.items():
        rt.add_core("blob", sinks[n], ("test.",))
    async with trio.open_nursery() as nursery:
        for rt in rts.values():
            await nursery.start(rt.run)
        await wait_until(lambda: all(s.up for s in sinks.values()), "both links up")
        link = _link(rts["dc1"], "dc2")
        assert link._direct is not None
        direct = link._direct
        await wait_until(lambda: link._parked and direct.writable_now, "the writer parked")
        direct.try_write = lambda data: False  # type: ignore[method-assign]

        def send(core: Any, now: float) -> list[Action]:
            return [Send("dc2", Blob(7, b"lost"))]

        await rts["dc1"].invoke("blob", send, "a send the socket refuses")  # no raise
        assert link.direct_failed == 1
        # The frame the turn encrypted never left, so the writer's next one does not
        # decrypt at dc2: the link ends there, and the node goes on (a new link).
        await wait_until(lambda: link.end_reason is not None, "the old link ended")
        await wait_until(lambda: rts["dc1"]._peers.link("dc2") not in (None, link),
                         "a new link", timeout=30)
        await rts["dc1"].invoke("blob", lambda core, now: [Send("dc2", Blob(8, b"ok"))],
                                "a send on the new link")
        await wait_until(lambda: 8 in sinks["dc2"].seqs, "the message on the new link")
        for rt in rts.values():
            rt.shutdown()
