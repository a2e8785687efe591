"""Control links with our own framing after the link hello (mesh.runtime.link_stream,
mesh.versions.CONTROL_FRAMES, issue 14): the frame reader under random splits,
truncation, oversized lengths and garbage; links between framed and websocket-only
runtimes; the keepalive that replaces websocket pings; and a peer that breaks the
framing after authenticating, which ends its link and never the node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import wsproto.connection
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection, connect_websocket

from federation.node.node_config import NodeConfigError, load_node_config
from mesh import versions, wire
from mesh.channel import LENGTH_BYTES, ChannelError, FrameReader, SecureChannel, frame
from mesh.core import Action, Event, PeerUp, Received, Send
from mesh.runtime import link as link_module
from mesh.runtime.link import Link, open_link
from mesh.runtime.link_stream import DirectStream
from mesh.runtime.node_runtime import RESOURCE, Runtime
from mesh.wire import U64, field
from tests.harness.hostile import Federation
from tests.harness.runtime import Mesh
from tests.harness.waiting import wait_until

MAX = 1000


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


frames_st = st.lists(st.binary(max_size=MAX), max_size=12)


@given(frames_st, st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_of_a_stream_gives_back_its_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(f) for f in frames)
    for reuse in (False, True):
        reader = FrameReader(MAX)
        got: list[bytes] = []
        for piece in _split(stream, cuts):
            if reuse:  # a view of a buffer the link reuses: nothing of it may be kept
                buf = bytearray(piece)
                got += reader.feed(memoryview(buf))
                buf[:] = b"\xee" * len(buf)
            else:
                got += reader.feed(piece)
            assert reader.pending < LENGTH_BYTES + MAX
        assert got == frames
        assert reader.pending == 0


@given(frames_st, st.integers(min_value=0), st.lists(st.integers(min_value=0), max_size=8))
def test_a_truncated_stream_gives_a_prefix_and_holds_the_rest(
    frames: list[bytes], cut: int, cuts: list[int]
) -> None:
    stream = b"".join(frame(f) for f in frames)
    head = stream[: cut % (len(stream) + 1)]
    reader = FrameReader(MAX)
    got: list[bytes] = []
    for piece in _split(head, cuts):
        got += reader.feed(piece)
    assert got == frames[: len(got)]
    assert len(b"".join(frame(f) for f in got)) + reader.pending == len(head)


@given(st.integers(min_value=MAX + 1, max_value=2**32 - 1), st.binary(max_size=50),
       st.lists(st.binary(max_size=MAX), max_size=3))
def test_an_oversized_length_is_refused_before_its_bytes_arrive(
    n: int, tail: bytes, before: list[bytes]
) -> None:
    reader = FrameReader(MAX)
    ok = b"".join(frame(f) for f in before)
    assert reader.feed(ok) == before
    with pytest.raises(ChannelError) as exc:
        reader.feed(n.to_bytes(LENGTH_BYTES, "big"))  # the prefix alone is enough
    assert exc.value.reason == "oversized" and str(n) in exc.value.detail
    assert reader.pending == 0  # nothing of that frame is kept
    with pytest.raises(ChannelError):  # the stream has lost its framing for good
        reader.feed(tail)


@given(st.binary(max_size=4000), st.lists(st.integers(min_value=0), max_size=20))
def test_garbage_gives_frames_or_oversized_never_anything_else(
    data: bytes, cuts: list[int]
) -> None:
    reader = FrameReader(MAX)
    try:
        for piece in _split(data, cuts):
            for f in reader.feed(piece):
                assert len(f) <= MAX
            assert reader.pending < LENGTH_BYTES + MAX
    except ChannelError as exc:
        assert exc.reason == "oversized"


# ------------------------------------------------------------------ runtimes


@wire.message("test.frames-count", max_size=64)
class Count:
    n: int = field(U64())


class _Counter:
    def __init__(self) -> None:
        self.up: set[str] = set()
        self.got: dict[str, list[int]] = {}

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, PeerUp):
            self.up.add(event.peer)
        if isinstance(event, Received) and isinstance(event.message, Count):
            self.got.setdefault(event.peer, []).append(event.message.n)
        return []


def _link(rt: Runtime, peer: str) -> Link:
    link = rt._peers.link(peer)
    assert link is not None
    return link


async def test_framed_and_websocket_only_runtimes_link_and_carry_in_order(
    tmp_path: Path,
) -> None:
    """dc3 is a peer of an older build (no CONTROL_FRAMES): dc1-dc2 switch to frames,
    every link with dc3 keeps the websocket, and all carry messages in order."""
    mesh = Mesh(3, tmp_path)
    rts = {n: mesh.runtime(n, framed=n != "dc3") for n in mesh.names}
    cores = {n: _Counter() for n in mesh.names}
    for n, rt in rts.items():
        rt.add_core("count", cores[n], ("test.",))
    async with trio.open_nursery() as nursery:
        for rt in rts.values():
            await nursery.start(rt.run)
        await wait_until(lambda: all(len(c.up) == 2 for c in cores.values()), "all links up")
        for a in mesh.names:
            for b in mesh.names:
                if a != b:
                    assert _link(rts[a], b).framed is ("dc3" not in (a, b)), (a, b)
                    assert (versions.CONTROL_FRAMES in _link(rts[a], b).peer_versions) is (
                        b != "dc3")
        # trio-websocket 0.12.2's and wsproto 1.3's private names the switch relies on
        ws = _link(rts["dc1"], "dc2").ws
        assert ws._recv_channel.statistics().current_buffer_used == 0
        assert ws._close_reason is None and callable(ws._close_stream)
        proto = wsproto.connection.Connection(wsproto.connection.ConnectionType.CLIENT)._proto
        assert len(proto._frame_decoder.buffer) == 0

        def burst(peer: str, start: int) -> Any:
            def fn(core: Any, now: float) -> list[Action]:
                return [Send(peer, Count(start + i)) for i in range(50)]
            return fn

        for a in mesh.names:
            for b in mesh.names:
                if a != b:
                    for start in (0, 50, 100):
                        await rts[a].invoke("count", burst(b, start), "a burst")
        await wait_until(lambda: all(len(v) == 150 for c in cores.values()
                                     for v in c.got.values()) and
                         all(len(c.got) == 2 for c in cores.values()), "every message")
        for c in cores.values():
            assert all(v == list(range(150)) for v in c.got.values())
        for rt in rts.values():
            rt.shutdown()
    for n in mesh.names:
        closed = [e for e in mesh.events(n) if e["event"] == "link_closed"]
        assert closed and all(e["reason"] == "clean" for e in closed), closed
        ups = [e for e in mesh.events(n) if e["event"] == "peer_up"]
        assert {e["peer"]: e["framing"] for e in ups} == {
            p: "websocket" if "dc3" in (n, p) else "frames" for p in mesh.names if p != n}


@pytest.fixture
def fast_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The framed keepalive's bounds, scaled down 10x so a test sees several periods."""
    monkeypatch.setattr(link_module, "KEEPALIVE_TICK", 0.05)
    monkeypatch.setattr(link_module, "HEARTBEAT_INTERVAL", 0.25)
    monkeypatch.setattr(link_module, "IDLE_TIMEOUT", 0.75)


async def test_an_idle_framed_link_stays_up_and_a_silent_peer_is_dropped(
    tmp_path: Path, fast_keepalive: None
) -> None:
    mesh = Mesh(2, tmp_path)
    rts = {n: mesh.runtime(n) for n in mesh.names}
    cores = {n: _Counter() for n in mesh.names}
    for n, rt in rts.items():
        rt.add_core("count", cores[n], ("test.",))
    async with trio.open_nursery() as nursery:
        for rt in rts.values():
            await nursery.start(rt.run)
        await wait_until(lambda: all(len(c.up) == 1 for c in cores.values()), "links up")
        first = _link(rts["dc1"], "dc2")
        assert first.framed
        # idle for four idle timeouts: heartbeats keep it up
        await wait_until(lambda: rts["dc1"].counters.get("messages_in", 0) >= 8,
                         "heartbeats arrive")
        assert _link(rts["dc1"], "dc2") is first and first.end_reason is None
        # dc2's end goes silent without closing the socket (a peer that vanished: no FIN)
        silent = _link(rts["dc2"], "dc1")
        silent.enqueue = lambda payload: True  # type: ignore[method-assign]
        await wait_until(lambda: first.end_reason is not None, "dc1 drops the silent link")
        assert first.end_reason == "keepalive_timeout"
        # ... and the mesh heals with a fresh link
        await wait_until(lambda: (link := rts["dc1"]._peers.link("dc2")) is not None
                         and link is not first, "a new link")
        for rt in rts.values():
            rt.shutdown()


async def _framed_attacker(fed: Federation, port: int, nursery: trio.Nursery,
                           ) -> tuple[WebSocketConnection, Any]:
    """dc2's real key dialling dc1 with CONTROL_FRAMES: a compromised or broken peer
    that is authenticated, then sends what it likes on the framed stream."""
    ws = await connect_websocket(nursery, "127.0.0.1", port, RESOURCE, use_ssl=False)
    channel = SecureChannel(identity=fed.ids["dc2"], name="dc2", federation=fed.federation,
                            peers=fed.keys(), versions=(1, 3, versions.CONTROL_FRAMES),
                            initiator=True, peer="dc1")
    await open_link(ws, channel, b"\x01" * 16)
    direct = ws._stream
    assert isinstance(direct, DirectStream) and direct.framed
    return ws, direct


@pytest.mark.parametrize("garbage, reason", [
    ((2**32 - 1).to_bytes(4, "big") + b"x" * 100, "oversized"),
    ((100).to_bytes(4, "big") + bytes(100), "tampered"),
    ((3).to_bytes(4, "big") + b"abc", "tampered"),
], ids=["oversized", "forged", "short"])
async def test_a_peer_that_breaks_the_framing_ends_its_link_not_the_node(
    garbage: bytes, reason: str
) -> None:
    fed = Federation(2)
    rt = fed.runtime("dc1")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        async with trio.open_nursery() as conn:
            ws, direct = await _framed_attacker(fed, fed.ports["dc1"], conn)
            await wait_until(lambda: rt._peers.link("dc2") is not None, "dc2 adopted")
            await direct.send_all(garbage)
            await wait_until(lambda: rt.refused.get(reason, 0) >= 1, f"refused: {reason}")
            await wait_until(lambda: rt._peers.link("dc2") is None, "the link ended")
            await direct.aclose()
            conn.cancel_scope.cancel()
        # the node still takes an honest link (a fresh one from the same peer)
        async with trio.open_nursery() as conn:
            ws, direct = await _framed_attacker(fed, fed.ports["dc1"], conn)
            await wait_until(lambda: rt._peers.link("dc2") is not None, "dc2 again")
            conn.cancel_scope.cancel()
        rt.shutdown()


async def test_a_websocket_message_across_the_switch_point_is_refused() -> None:
    """An initiator that sends another websocket message right after its link hello
    (breaking the order of the switch): the responder refuses the connection; the bytes
    are never taken as frames of an honest peer."""
    fed = Federation(2)
    rt = fed.runtime("dc1")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        async with trio.open_nursery() as conn:
            ws = await connect_websocket(conn, "127.0.0.1", fed.ports["dc1"], RESOURCE,
                                         use_ssl=False)
            channel = SecureChannel(identity=fed.ids["dc2"], name="dc2",
                                    federation=fed.federation, peers=fed.keys(),
                                    versions=(1, 3, versions.CONTROL_FRAMES),
                                    initiator=True, peer="dc1")
            for f in channel.frames_to_send():
                await ws.send_message(f)
            welcome = await ws.get_message()
            assert isinstance(welcome, bytes)
            channel.receive_frame(welcome)
            for f in channel.frames_to_send():
                await ws.send_message(f)
            hello = channel.send(wire.encode(link_module.LinkHello(b"\x02" * 16)))
            await ws.send_message(hello)
            await ws.send_message(channel.send(wire.encode(link_module.LinkHello(b"\x03" * 16))))
            await wait_until(lambda: sum(rt.refused.get(r, 0) for r in
                                         ("malformed", "oversized", "tampered")) >= 1,
                             "the connection refused")
            assert rt._peers.link("dc2") is None
            conn.cancel_scope.cancel()
        rt.shutdown()


@pytest.mark.parametrize("text, framed", [
    ("", True), ('[control]\nframing = "frames"\n', True),
    ('[control]\nframing = "websocket"\n', False),
])
def test_the_node_config_says_whether_a_node_offers_frames(
    tmp_path: Path, text: str, framed: bool
) -> None:
    path = tmp_path / "dc1.toml"
    path.write_text(text)
    assert load_node_config(path).control_frames is framed


@pytest.mark.parametrize("text", ['[control]\nframing = "tcp"\n', "[control]\nframing = 1\n",
                                  '[control]\nframes = "websocket"\n'])
def test_a_bad_framing_setting_is_refused_by_name(tmp_path: Path, text: str) -> None:
    path = tmp_path / "dc1.toml"
    path.write_text(text)
    with pytest.raises(NodeConfigError, match=r"dc1.toml: control\.fram"):
        load_node_config(path)


async def test_a_large_frame_arriving_slowly_is_not_silence(fast_keepalive: None) -> None:
    """The idle timeout counts bytes, not frames: a peer trickling one large frame for
    three idle timeouts keeps its link; when the bytes stop, the link ends."""
    fed = Federation(2)
    rt = fed.runtime("dc1")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        async with trio.open_nursery() as conn:
            ws, direct = await _framed_attacker(fed, fed.ports["dc1"], conn)
            await wait_until(lambda: rt._peers.link("dc2") is not None, "dc2 adopted")
            link = _link(rt, "dc2")
            await direct.send_all((100_000).to_bytes(4, "big"))
            for _ in range(45):  # 2.25 s, three idle timeouts of the fixture
                await direct.send_all(b"\0" * 100)
                await trio.sleep(0.05)  # the slow peer's pace, not a wait for a result
            assert rt._peers.link("dc2") is link and link.end_reason is None
            await wait_until(lambda: link.end_reason is not None, "the link ends")
            assert link.end_reason == "keepalive_timeout"
            conn.cancel_scope.cancel()
        rt.shutdown()
