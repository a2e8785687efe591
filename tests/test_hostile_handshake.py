"""Before authentication nothing can hurt a node (issue 15, item 1).

Small-order X25519 keys, frames longer than the handshake state allows, libsodium's
refusals, floods of connections that never finish their handshake, and one
connection's fault: each is refused by name and the node keeps serving real peers.
"""

from __future__ import annotations

import random
from pathlib import Path

import nacl.bindings as sodium
import nacl.exceptions
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection, connect_websocket

from mesh import wire
from mesh.amst.receiver import Ack
from mesh.channel import (
    ChannelError,
    Hello,
    Welcome,
    WelcomeBody,
    small_order,
)
from mesh.runtime import node_runtime
from mesh.runtime.admission import StartupGate, StartupLimits
from mesh.runtime.amst_transfer import DATA_STARTUPS, AmstServer
from mesh.runtime.link import HANDSHAKE_READ_BYTES, open_link
from tests.harness.hostile import ATTACKER_HOSTS, Federation, closed_by_peer, connect_from, until

_P = 2**255 - 19
_ORDER_8 = (
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)
#: Every encoding of a small-order point: u and u + p where it fits, each also with the
#: top bit set (X25519 ignores it).
SMALL_ORDER_KEYS = tuple(sorted({
    (u | top).to_bytes(32, "little")
    for base in (0, 1, _P - 1, *_ORDER_8)
    for u in (base, base + _P) if u < 2**255
    for top in (0, 1 << 255)
}))


def test_the_small_order_list_is_what_libsodium_refuses() -> None:
    scalar = bytes(range(1, 33))
    for key in SMALL_ORDER_KEYS:
        assert small_order(key)
        with pytest.raises(nacl.exceptions.CryptoError):
            sodium.crypto_scalarmult(scalar, key)
    assert len(SMALL_ORDER_KEYS) >= 14


@given(st.binary(min_size=32, max_size=32))
def test_small_order_matches_libsodium_on_any_key(key: bytes) -> None:
    try:
        sodium.crypto_scalarmult(bytes(range(1, 33)), key)
    except nacl.exceptions.CryptoError:
        refused = True
    else:
        refused = False
    assert small_order(key) == refused


def _hello(fed: Federation, ephemeral: bytes) -> bytes:
    return wire.encode(Hello(fed.federation, "dc1", "dc2", (1, 3), ephemeral, bytes(32),
                             bytes(32), bytes(32), b""))


@pytest.mark.parametrize("key", SMALL_ORDER_KEYS[:8], ids=lambda k: k[:4].hex())
def test_a_hello_with_a_small_order_key_is_refused_by_name(tmp_path: Path, key: bytes) -> None:
    fed = Federation(2, tmp_path)
    responder = fed.channel("dc2")
    with pytest.raises(ChannelError) as err:
        responder.receive_frame(_hello(fed, key))
    assert err.value.reason == "weak_key"
    assert responder.frames_to_send() == []  # nothing signed for it
    with pytest.raises(ChannelError):  # and the channel is dead
        responder.receive_frame(_hello(fed, bytes(range(32))))


def test_a_welcome_with_a_small_order_key_is_refused(tmp_path: Path) -> None:
    """A DC holding a valid key (Byzantine) answers with an all-zero ephemeral key."""
    fed = Federation(2, tmp_path)
    initiator = fed.channel("dc1", peer="dc2")
    hello_raw = initiator.frames_to_send()[0]
    body = wire.encode(WelcomeBody(fed.federation, "dc2", "dc1", (1, 3), bytes(32), bytes(32),
                                   bytes(24), fed.ids["dc2"].public.raw, bytes(32), b""))
    sig = fed.ids["dc2"].sign(b"dwcp/1 responder\x00" + hello_raw + body)
    with pytest.raises(ChannelError) as err:
        initiator.receive_frame(wire.encode(Welcome(body, sig)))
    assert err.value.reason == "weak_key"


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=40))
def test_any_hello_ends_in_a_welcome_or_a_channel_error(key: bytes, nonce: bytes) -> None:
    responder = Federation(2).channel("dc2")
    try:
        raw = wire.encode(Hello("hostile", "dc1", "dc2", (1, 3), key, nonce, key, bytes(32), b""))
    except wire.WireError:
        raw = key + nonce
    try:
        responder.receive_frame(raw)
    except ChannelError as exc:
        assert exc.reason in ChannelError.REASONS
    else:
        assert not small_order(key) and len(responder.frames_to_send()) == 1


def test_frame_limits_follow_the_handshake_state(tmp_path: Path) -> None:
    fed = Federation(2, tmp_path)
    responder = fed.channel("dc2")
    assert responder.max_frame == 1024  # a Hello
    with pytest.raises(ChannelError) as err:
        responder.receive_frame(bytes(1025))
    assert err.value.reason == "oversized"
    assert responder.max_frame == 0  # dead
    initiator = fed.channel("dc1", peer="dc2")
    assert initiator.max_frame == 2048  # a Welcome
    responder = fed.channel("dc2")
    responder.receive_frame(initiator.frames_to_send()[0])
    assert responder.max_frame == 512  # a Finish
    initiator.receive_frame(responder.frames_to_send()[0])
    responder.receive_frame(initiator.frames_to_send()[0])
    assert initiator.is_open and responder.max_frame > 8 * 1024 * 1024


# --------------------------------------------------------------------------- the gate


def test_the_gate_admits_up_to_start_then_drops_early_then_all() -> None:
    gate = StartupGate(StartupLimits(start=4, rate=50, full=8, per_source=100), random.Random(3))
    admitted = [gate.admit(f"10.0.0.{i}") for i in range(4)]
    assert all(not isinstance(a, str) for a in admitted) and gate.pending == 4
    outcomes = [gate.drop_reason("10.0.1.1") for _ in range(400)]
    assert 0.3 < outcomes.count("early_drop") / 400 < 0.7  # rate 50 % at start
    while gate.pending < 8:
        gate.admit("10.0.2.1")
    assert gate.drop_reason("10.0.3.1") == "startups_full"
    for a in admitted:
        assert not isinstance(a, str)
        a.authenticated()
        a.close()  # a second release changes nothing
    assert gate.pending == 4


def test_the_gate_caps_one_source() -> None:
    gate = StartupGate(StartupLimits(start=100, rate=30, full=200, per_source=2),
                       random.Random(1))
    first, second = gate.admit("a"), gate.admit("a")
    assert gate.admit("a") == "source_limit" and not isinstance(gate.admit("b"), str)
    assert not isinstance(first, str) and not isinstance(second, str)
    first.close()
    assert not isinstance(gate.admit("a"), str)


# --------------------------------------------------------------------------- a live node


async def _linked(fed: Federation, rt: node_runtime.Runtime, name: str = "dc2") -> None:
    """A real peer ``name`` completes a handshake with ``rt`` and gets its link hello."""
    with trio.fail_after(10):
        await _link_once(fed, rt, name)


async def _link_once(fed: Federation, rt: node_runtime.Runtime, name: str) -> None:
    async with trio.open_nursery() as nursery:
        ws: WebSocketConnection = await connect_websocket(
            nursery, "127.0.0.1", fed.ports[rt.name], node_runtime.RESOURCE, use_ssl=False)
        peer, _ = await open_link(ws, fed.channel(name, peer=rt.name), bytes(16))
        assert peer == rt.name
        await ws.aclose()


async def test_an_oversized_message_before_the_handshake_closes_that_connection(
    tmp_path: Path,
) -> None:
    fed = Federation(2, tmp_path)
    rt = fed.runtime("dc1")
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        async with trio.open_nursery() as conn:
            ws = await connect_websocket(conn, "127.0.0.1", fed.ports["dc1"],
                                         node_runtime.RESOURCE, use_ssl=False)
            await ws.send_message(bytes(64 * 1024))  # far more than a Hello's 1 KiB
            await until(lambda: ws.closed is not None)
            assert ws.closed is not None and ws.closed.code == 1009  # message too big
            conn.cancel_scope.cancel()
        await _linked(fed, rt)  # and the node still answers a real peer
        rt.shutdown()


async def test_a_flood_of_silent_connections_is_capped_and_real_peers_get_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(node_runtime, "HANDSHAKE_TIMEOUT", 1.0)
    fed = Federation(2, tmp_path)
    rt = fed.runtime("dc1")
    per_source = node_runtime.CONTROL_STARTUPS.per_source
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        flood = [await connect_from("127.0.0.1", fed.ports["dc1"], ATTACKER_HOSTS[0])
                 for _ in range(3 * per_source)]
        await until(lambda: rt.refused.get("source_limit", 0) == 2 * per_source)
        await _linked(fed, rt)  # from 127.0.0.1, while the flood holds its places
        assert "early_drop" not in rt.refused  # one address cannot push others out
        # the ones admitted are cut at the handshake deadline
        await until(lambda: rt.refused.get("handshake_deadline", 0) == per_source)
        assert all([await closed_by_peer(s) for s in flood])
        assert rt._gate.pending == 0 and rt._gate.by_source == {}
        rt.shutdown()


async def test_one_connection_that_raises_ends_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed = Federation(2, tmp_path)
    rt = fed.runtime("dc1")
    original = rt._on_request
    calls = []

    async def faulty(request, startup, deadline):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug a peer can reach")
        await original(request, startup, deadline)

    monkeypatch.setattr(rt, "_on_request", faulty)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with pytest.raises(Exception):  # noqa: B017 - the first connection is cut
            await _linked(fed, rt)
        await until(lambda: rt.counters.get("connection_failed", 0) == 1)
        await _linked(fed, rt)
        assert [e for e in fed.events("dc1") if e["event"] == "connection_failed"]
        rt.shutdown()


def test_trio_websocket_still_has_the_bounds_we_set() -> None:
    """mesh.runtime.link.bound_messages sets two private attributes of trio-websocket's
    connection; if a release renames them, this fails rather than the bound vanishing."""
    import inspect

    from trio_websocket import _impl

    source = inspect.getsource(_impl.WebSocketConnection)
    assert "self._max_message_size" in source and "self._receive_buffer_size" in source
    assert HANDSHAKE_READ_BYTES >= 2 * Welcome.wire_max_size  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the data listener


async def test_data_listener_caps_floods_bounds_frames_and_survives_a_faulty_opener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mesh.runtime import amst_stream
    from mesh.runtime.log import JsonLog

    monkeypatch.setattr(amst_stream, "HANDSHAKE_TIMEOUT_S", 1.0)
    fed = Federation(2, tmp_path)

    async def opener(link: amst_stream.Link, msg: object) -> None:
        raise RuntimeError("an opener's bug")

    server = AmstServer(lambda: fed.channel("dc2"), rng=random.Random(1))
    server.openers[Ack] = opener  # any message type a peer can open with
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners, JsonLog("dc2", None))
        # a declared length of 8 MiB before the handshake: refused before it is read
        s = await connect_from("127.0.0.1", port, ATTACKER_HOSTS[1])
        await s.send_all((8 << 20).to_bytes(4, "big"))
        assert await closed_by_peer(s)
        await until(lambda: server.refused.get("oversized", 0) == 1)
        # a flood from one address: at most per_source wait for their handshake
        cap = DATA_STARTUPS.per_source
        flood = [await connect_from("127.0.0.1", port, ATTACKER_HOSTS[2])
                 for _ in range(cap + 5)]
        await until(lambda: server.refused.get("source_limit", 0) == 5)
        await until(lambda: server.refused.get("handshake_deadline", 0) == cap)
        assert all([await closed_by_peer(f) for f in flood])
        assert server.gate.pending == 0
        # a handler that raises ends its own connection; the next one is served
        for _ in range(2):
            link = amst_stream.Link(await trio.open_tcp_stream("127.0.0.1", port),
                                    fed.channel("dc1", peer="dc2"))
            await link.handshake()
            await link.send_message(Ack(0, (), ()))
            assert await closed_by_peer(link.sock)  # type: ignore[arg-type]
            await link.aclose()
        await until(lambda: server.refused.get("connection_failed", 0) == 2)
        nursery.cancel_scope.cancel()


async def test_running_out_of_descriptors_backs_off_and_recovers(tmp_path: Path) -> None:
    """A node whose RLIMIT_NOFILE is nearly used up (a subprocess with
    ``resource.setrlimit``) is flooded until accept() fails with EMFILE: it backs off,
    stays up, and serves a real peer once the flood is gone."""
    import json
    import subprocess
    import sys

    fed = Federation(2, tmp_path)
    root = Path(__file__).resolve().parent.parent
    code = (f"from tests.harness.hostile import fd_limited_node; "
            f"fd_limited_node({fed.ports['dc1']}, {fed.ports['dc2']}, 12)")
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE)
    events: list[dict] = []
    buffer = bytearray()

    async def read_log() -> None:
        assert child.stdout is not None
        async for data in child.stdout:
            buffer.extend(data)
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                events.append(json.loads(line))

    def seen(kind: str) -> bool:
        return any(e["event"] == kind for e in events)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_log)
            await until(lambda: seen("listening"))
            flood = []
            for host in ATTACKER_HOSTS:  # 5 from each address: all admitted, then EMFILE
                for _ in range(node_runtime.CONTROL_STARTUPS.per_source):
                    flood.append(await connect_from("127.0.0.1", fed.ports["dc1"], host))
            await until(lambda: seen("accept_backoff"))
            assert child.returncode is None
            for s in flood:
                await s.aclose()
            await until(lambda: seen("accept_recovered"))
            await _linked(fed, _Remote("dc1"))  # type: ignore[arg-type]
            assert child.returncode is None
            nursery.cancel_scope.cancel()
    finally:
        child.kill()
        await child.wait()


class _Remote:
    """Stands for a runtime in another process: only its name is needed to dial it."""

    def __init__(self, name: str) -> None:
        self.name = name
