"""The node runtime in one process: policy units, the SQLite store, and runtimes on loopback."""

from __future__ import annotations

import random
import socket
import sqlite3
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, connect_websocket

from mesh import identity, wire
from mesh.channel import ChannelError, Closed, SecureChannel
from mesh.core import (
    Action,
    CancelTimer,
    Event,
    Notify,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from mesh.runtime.link import LinkHello, LinkSuperseded, open_link
from mesh.runtime.link_policy import BACKOFF_CAP, Backoff, LinkClaim, keep_new_link
from mesh.runtime.node_runtime import RESOURCE, ListenError, Runtime
from mesh.runtime.sqlite_store import SQLiteStore, StoreFull
from mesh.wire import U64, Text, field
from tests.harness.runtime import Mesh
from tests.harness.waiting import wait_until

# --------------------------------------------------------------------------- backoff


def test_backoff_windows_double_then_cap() -> None:
    b = Backoff(random.Random(1), base=0.1, cap=4.0)
    assert [b.window(n) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 4.0, 4.0]
    assert b.window(10_000) == 4.0  # no float overflow for a peer down for days


def test_backoff_full_jitter_is_seeded_and_within_window() -> None:
    a = Backoff(random.Random(7))
    b = Backoff(random.Random(7))
    delays = [a.delay(n) for n in range(50)]
    assert delays == [b.delay(n) for n in range(50)]
    assert all(0.0 <= d < a.window(n) for n, d in enumerate(delays))
    assert max(delays) <= BACKOFF_CAP
    # Full jitter spreads over the whole window: not all near the top, not all near zero.
    late = [a.delay(20) for _ in range(400)]
    assert min(late) < 0.5 and max(late) > 3.5


def test_backoff_cap_leaves_room_for_the_10s_reconnect_bound() -> None:
    assert BACKOFF_CAP < 10.0 / 2
    with pytest.raises(ValueError):
        Backoff(random.Random(), base=5.0, cap=1.0)


# --------------------------------------------------------------------------- tie-break

names = st.text(alphabet="abcdefgh0123456789", min_size=1, max_size=6)
incarnations = st.binary(min_size=16, max_size=16)


def _survivor(local: str, peer: str, arrivals: list[tuple[str, LinkClaim]]) -> str:
    """Run the tie-break over connections arriving in order; return the surviving id."""
    current: tuple[str, LinkClaim] | None = None
    for conn_id, claim in arrivals:
        if current is None or keep_new_link(local, peer, current[1], claim):
            current = (conn_id, claim)
    assert current is not None
    return current[0]


@given(names, names, incarnations, incarnations, st.booleans(), st.booleans())
def test_simultaneous_dials_leave_the_same_connection_at_both_ends(
    a: str, b: str, inc_a: bytes, inc_b: bytes, a_sees_own_first: bool, b_sees_own_first: bool
) -> None:
    assume(a != b)
    # Connection "x" was dialled by a, "y" by b. Each end records the other's incarnation.
    at_a = [("x", LinkClaim(a, inc_b)), ("y", LinkClaim(b, inc_b))]
    at_b = [("x", LinkClaim(a, inc_a)), ("y", LinkClaim(b, inc_a))]
    if not a_sees_own_first:
        at_a.reverse()
    if not b_sees_own_first:
        at_b.reverse()
    kept_a = _survivor(a, b, at_a)
    kept_b = _survivor(b, a, at_b)
    assert kept_a == kept_b == ("x" if a < b else "y")


@given(names, names, incarnations, incarnations)
def test_a_restarted_peer_replaces_a_half_open_link(a: str, b: str, old: bytes, new: bytes) -> None:
    assume(a != b and old != new)
    # a still holds the link a dialled to b's old process; b restarted and dialled a.
    assert keep_new_link(a, b, LinkClaim(a, old), LinkClaim(b, new))


def test_a_redial_by_the_same_initiator_replaces_the_old_link() -> None:
    inc = bytes(16)
    assert keep_new_link("dc2", "dc1", LinkClaim("dc1", inc), LinkClaim("dc1", inc))
    assert keep_new_link("dc1", "dc2", LinkClaim("dc2", inc), LinkClaim("dc2", inc))


# --------------------------------------------------------------------------- store


def test_sqlite_store_round_trip_prefix_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    store = SQLiteStore(path)
    store.put("pbft/log/2", b"two")
    store.put("pbft/log/1", b"one")
    store.put("pbft/view", b"\x00", sync=False)
    store.put("pbft/log/1", b"uno")
    store.put("pbft0", b"not under pbft/")
    store.put_many([("migration/a", b"a"), ("migration/b", b"b")])
    store.delete_many(["migration/a", "migration/b", "migration/absent"])
    store.delete_many([])
    assert store.keys("migration/") == []
    assert store.get("pbft/log/1") == b"uno"
    assert store.get("missing") is None
    assert store.keys("pbft/") == ["pbft/log/1", "pbft/log/2", "pbft/view"]
    assert store.keys() == ["pbft/log/1", "pbft/log/2", "pbft/view", "pbft0"]
    store.close()
    reopened = SQLiteStore(path)
    assert reopened.get("pbft/view") == b"\x00"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(TypeError):
        reopened.put("k", "not bytes")  # type: ignore[arg-type]
    reopened.close()


def test_a_full_disk_refuses_the_write_whole_and_the_same_write_goes_in_later(
        tmp_path: Path) -> None:
    """SQLITE_FULL (here from max_page_count, as from a full file system): StoreFull, the
    transaction rolled back (none of the group kept, earlier records intact), the
    connection still usable; once there is room the same write is made again."""
    store = SQLiteStore(tmp_path / "node.sqlite3")
    store.put("a", b"kept")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages + 2}")
    big = [(f"k{i}", bytes([i]) * 3000) for i in range(20)]
    with pytest.raises(StoreFull, match="full"):
        store.put_many(big)
    with pytest.raises(StoreFull):
        store.put("one", bytes(50_000))
    assert store.keys() == ["a"] and store.get("a") == b"kept"
    assert not store._db.in_transaction
    store._db.execute("PRAGMA max_page_count=1073741823")
    store.put_many(big)
    assert store.get("k19") == bytes([19]) * 3000
    store.close()


# --------------------------------------------------------------------------- runtimes on loopback


@wire.message("test.runtime-ping", max_size=256)
class Ping:
    seq: int = field(U64())
    origin: str = field(Text(16))


@wire.message("test.runtime-pong", max_size=256)
class Pong:
    seq: int = field(U64())


class EchoCore:
    """Pings every peer that comes up, answers pings, arms and cancels timers, persists."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[float, Event]] = []
        self.pongs: dict[str, int] = {}

    def handle(self, now: float, event: Event) -> list[Action]:
        self.events.append((now, event))
        if isinstance(event, PeerUp):
            return [
                Send(event.peer, Ping(1, self.name)),
                SetTimer(("tick", event.peer), now + 0.05),
            ]
        if isinstance(event, Received) and isinstance(event.message, Ping):
            assert wire.decode(event.raw) == event.message  # raw is the frame as received
            return [
                Send(event.peer, Pong(event.message.seq)),
                Persist(f"pinged-by/{event.peer}", b"1"),
            ]
        if isinstance(event, Received) and isinstance(event.message, Pong):
            self.pongs[event.peer] = event.message.seq
            return [Notify("pong", {"peer": event.peer})]
        if isinstance(event, TimerFired):
            return [SetTimer("never", now + 3600), CancelTimer("never")]
        return []

    def timers_fired(self) -> list[Hashable]:
        return [e.key for _, e in self.events if isinstance(e, TimerFired)]


async def test_runtimes_form_one_link_per_pair_and_host_cores(tmp_path: Path) -> None:
    mesh = Mesh(3, tmp_path)
    runtimes = {n: mesh.runtime(n, seed=i) for i, n in enumerate(mesh.names)}
    cores = {n: EchoCore(n) for n in mesh.names}
    for n, rt in runtimes.items():
        rt.add_core("echo", cores[n], ("test.",))
    async with trio.open_nursery() as nursery:
        for rt in runtimes.values():
            await nursery.start(rt.run)

        def settled() -> bool:
            return all(len(rt.links) == 2 for rt in runtimes.values()) and all(
                len(c.pongs) == 2 and len(c.timers_fired()) == 2 for c in cores.values()
            )

        await wait_until(settled, "every link up, every ping answered, every timer fired")
        # Settled means settled: no link comes or goes while nothing fails. The window is
        # what is tested (no event may happen in it), so it is a fixed time on purpose.
        link_events = ("peer_up", "peer_down", "link_replaced", "link_duplicate")
        before = {n: sum(e["event"] in link_events for e in mesh.events(n)) for n in mesh.names}
        await trio.sleep(0.3)
        after = {n: sum(e["event"] in link_events for e in mesh.events(n)) for n in mesh.names}
        assert before == after
        for a, rt in runtimes.items():
            for b, info in rt.links.items():
                other = runtimes[b].links[a]
                assert info.initiator == other.initiator  # both ends kept the same connection
                assert info.version == other.version == 3
        for n, core in cores.items():
            kinds = [type(e).__name__ for _, e in core.events]
            assert kinds.count("PeerUp") == 2 and "PeerDown" not in kinds
            times = [t for t, _ in core.events]
            assert times == sorted(times)  # now is trio's clock, never going back
            assert runtimes[n].store is not None
            assert len(runtimes[n].store.keys("pinged-by/")) == 2
        notify = [e for e in mesh.events("dc1") if e["event"] == "notify"]
        assert {e["detail"]["peer"] for e in notify} == {"dc2", "dc3"}
        for rt in runtimes.values():
            rt.shutdown()
    for n, rt in runtimes.items():
        closed = [e for e in mesh.events(n) if e["event"] == "link_closed"]
        assert closed and all(e["reason"] == "clean" for e in closed), closed
        assert rt.refused == {}
        assert mesh.events(n)[-1]["event"] == "stopped"


async def test_a_peer_of_another_federation_is_refused_and_counted(tmp_path: Path) -> None:
    mesh = Mesh(2, tmp_path)
    good = mesh.runtime("dc1")
    stranger = mesh.runtime("dc2", federation="other")
    async with trio.open_nursery() as nursery:
        await nursery.start(good.run)
        await nursery.start(stranger.run)
        await wait_until(lambda: good.refused.get("wrong_federation", 0) >= 1,
                         "the stranger refused")
        assert good.links == {} and stranger.links == {}
        refused = [e for e in mesh.events("dc1") if e["event"] == "channel_refused"]
        assert refused[0]["reason"] == "wrong_federation"
        good.shutdown()
        stranger.shutdown()


async def test_a_restarted_peer_is_redialled_and_seen_down_then_up(tmp_path: Path) -> None:
    mesh = Mesh(2, tmp_path)
    a = mesh.runtime("dc1")
    core = EchoCore("dc1")
    a.add_core("echo", core, ("test.",))
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        crash = trio.CancelScope()  # a hard stop of dc2: no final frames
        nursery.start_soon(_run_in, crash, mesh.runtime("dc2"))
        await wait_until(lambda: "dc2" in a.links, "dc2 up at dc1")
        crash.cancel()
        await wait_until(lambda: "dc2" not in a.links, "dc2 down at dc1")
        b2 = mesh.runtime("dc2", seed=1)
        await nursery.start(b2.run)
        await wait_until(lambda: "dc2" in a.links and "dc1" in b2.links, "the link back up")
        kinds = [type(e).__name__ for _, e in core.events if isinstance(e, (PeerUp, PeerDown))]
        assert kinds == ["PeerUp", "PeerDown", "PeerUp"]
        a.shutdown()
        b2.shutdown()


async def _run_in(scope: trio.CancelScope, rt: Runtime) -> None:
    with scope:
        await rt.run()


async def test_port_in_use_is_a_listen_error(tmp_path: Path) -> None:
    mesh = Mesh(2, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", mesh.ports["dc1"]))
        s.listen()
        with pytest.raises(ListenError, match="already in use"):
            await mesh.runtime("dc1").run()


def test_runtime_refuses_a_key_that_is_not_its_own(tmp_path: Path) -> None:
    mesh = Mesh(2, tmp_path)
    with pytest.raises(ValueError, match="not 'dc1'"):
        Runtime(
            name="dc1",
            federation="t",
            identity=mesh.ids["dc2"],
            public_key=mesh.ids["dc1"].public,
            peers=[],
            listen_host="127.0.0.1",
            listen_port=1,
            versions=(1,),
        )


async def test_handlers_get_their_tags_and_other_messages_are_counted(tmp_path: Path) -> None:
    mesh = Mesh(2, tmp_path)
    a, b = mesh.runtime("dc1"), mesh.runtime("dc2")
    got: list[tuple[str, Any]] = []
    a.add_handler(("test.runtime-pong",), lambda peer, message: got.append((peer, message)))
    with pytest.raises(ValueError, match="already has a consumer"):
        a.add_handler(("test.runtime-pong",), print)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        await wait_until(lambda: "dc2" in a.links and "dc1" in b.links, "the link up")
        assert b.send("dc1", Pong(7)) and b.send("dc1", Ping(1, "dc2"))
        assert not b.send("dc9", Pong(1))
        await wait_until(lambda: a.counters.get("unrouted") == 1 and len(got) == 1,
                         "the pong handled and the ping counted unrouted")
        assert got == [("dc2", Pong(7))]
        assert b.counters["send_no_link"] == 1
        with pytest.raises(RuntimeError, match="after the runtime started"):
            a.add_core("late", EchoCore("dc1"), ("test.late",))
        a.shutdown()
        b.shutdown()


# --------------------------------------------------------------------------- link hello


class _PeerSocket:
    """A websocket whose far end is a responder SecureChannel that, once open, sends
    ``payload`` as its first data frame."""

    def __init__(self, peer: Any, payload: bytes) -> None:
        self.peer = peer
        self.payload = payload
        self.incoming: list[bytes] = []
        self.sent_payload = False

    async def send_message(self, message: bytes) -> None:
        self.peer.receive_frame(message)
        self.incoming += self.peer.frames_to_send()
        if self.peer.is_open and not self.sent_payload:
            self.sent_payload = True
            self.incoming.append(self.peer.send(self.payload))

    async def get_message(self) -> bytes:
        if not self.incoming:
            raise ConnectionClosed(None)
        return self.incoming.pop(0)


_hello_payloads = st.one_of(
    st.binary(max_size=64),
    incarnations.map(lambda inc: wire.encode(LinkHello(inc))),
    st.just(wire.encode(Pong(1))),
)


@given(_hello_payloads)
def test_the_link_hello_is_the_first_message_or_the_link_is_refused(payload: bytes) -> None:
    ids = {
        "dc1": identity.Identity.from_seed(bytes(32)),
        "dc2": identity.Identity.from_seed(b"\x01" * 32),
    }
    keys = {n: i.public for n, i in ids.items()}
    me = SecureChannel(
        identity=ids["dc1"],
        name="dc1",
        federation="t",
        peers=keys,
        versions=(1, 3),
        initiator=True,
        peer="dc2",
    )
    peer = SecureChannel(
        identity=ids["dc2"],
        name="dc2",
        federation="t",
        peers=keys,
        versions=(1, 3),
        initiator=False,
    )
    try:
        expected = wire.decode(payload, expect=(LinkHello,))
    except wire.WireError:
        expected = None
    ws = _PeerSocket(peer, payload)
    try:
        result = trio.run(open_link, ws, me, b"\x07" * 16)
    except ChannelError as exc:
        assert expected is None and exc.reason == "malformed"
    else:
        assert expected is not None and result == ("dc2", expected.incarnation)
        assert me.version == 3 and me.peer_versions == (1, 3)


async def test_a_superseded_connection_hands_over_without_peer_down(tmp_path: Path) -> None:
    """dc1 (played by the test) lost a tie-break on its first connection: it says so,
    closes it, and its other connection reaches dc2 a moment later. dc2's cores must
    see dc1 up throughout."""
    mesh = Mesh(2, tmp_path)
    b = mesh.runtime("dc2")
    core = EchoCore("dc2")
    b.add_core("echo", core, ("test.",))
    incarnation = bytes(range(16))

    def channel() -> SecureChannel:
        return SecureChannel(
            identity=mesh.ids["dc1"], name="dc1", federation="t", peers=mesh.keys(),
            versions=(1, 3), initiator=True, peer="dc2",
        )  # fmt: skip

    async with trio.open_nursery() as nursery:
        await nursery.start(b.run)
        first_ch = channel()
        first = await connect_websocket(
            nursery, "127.0.0.1", mesh.ports["dc2"], RESOURCE, use_ssl=False
        )
        await open_link(first, first_ch, incarnation)
        await wait_until(lambda: "dc1" in b.links, "dc1 up at dc2")
        await first.send_message(first_ch.send(wire.encode(LinkSuperseded())))
        await first.send_message(first_ch.close())
        while not isinstance(first_ch.receive_frame(await first.get_message())[-1:][0], Closed):
            pass  # dc2's answer to our final frame (after any pings it queued)
        second_ch = channel()
        second = await connect_websocket(
            nursery, "127.0.0.1", mesh.ports["dc2"], RESOURCE, use_ssl=False
        )
        await open_link(second, second_ch, incarnation)
        await wait_until(lambda: b.links.get("dc1") is not None and b.links["dc1"].link_id == 2,
                         "the second connection in place")
        kinds = [type(e).__name__ for _, e in core.events if isinstance(e, (PeerUp, PeerDown))]
        assert kinds == ["PeerUp"]
        assert not [e for e in mesh.events("dc2") if e["event"] == "peer_down"]
        await first.aclose()
        await second.aclose()
        b.shutdown()


class StartingCore:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, now: float) -> list[Action]:
        self.calls.append("start")
        return [SetTimer("t", now)]

    def handle(self, now: float, event: Event) -> list[Action]:
        self.calls.append(type(event).__name__)
        return []


async def test_start_hook_and_invoke_run_in_the_cores_turn(tmp_path: Path) -> None:
    mesh = Mesh(1, tmp_path)
    rt = mesh.runtime("dc1")
    core = StartingCore()
    rt.add_core("c", core, ("test.start",))
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)

        def bump(c: StartingCore, now: float) -> list[Action]:
            c.calls.append("invoked")
            return [Persist("k", b"v"), Notify("invoked", now)]

        await rt.invoke("c", bump, "bump")
        assert core.calls[0] == "start" and core.calls[-1] == "invoked"
        assert rt.store is not None and rt.store.get("k") == b"v"  # done before invoke returns
        await wait_until(lambda: "TimerFired" in core.calls, "the start timer fired")
        with pytest.raises(KeyError, match="no core named 'x'"):
            await rt.invoke("x", bump)
        rt.shutdown()
    assert [e["kind"] for e in mesh.events("dc1") if e["event"] == "notify"] == ["invoked"]


async def test_a_websocket_protocol_error_ends_the_connection_not_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # trio-websocket issue #184: a Pong on a closing connection raises wsproto's
    # LocalProtocolError inside the library's reader task. It must stay contained.
    from wsproto.utilities import LocalProtocolError

    mesh = Mesh(2, tmp_path)
    victim = mesh.runtime("dc1")
    raised = 0

    async def broken_request(request: Any, *_: Any) -> None:
        nonlocal raised
        raised += 1
        raise LocalProtocolError("Event Pong cannot be sent in state LOCAL_CLOSING")

    monkeypatch.setattr(victim, "_on_request", broken_request)
    async with trio.open_nursery() as nursery:
        await nursery.start(victim.run)
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", mesh.ports["dc1"])
            await stream.send_all(
                b"GET /dwcp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            seen = victim.counters.get("ws_protocol_errors", 0)
            await wait_until(lambda seen=seen: victim.counters.get("ws_protocol_errors", 0) > seen,
                             "the protocol error counted")
            await stream.aclose()
        assert raised == 2 and victim.counters["ws_protocol_errors"] == 2
        assert any(e["event"] == "ws_protocol_error" for e in mesh.events("dc1"))
        victim.shutdown()


async def test_a_peer_refusing_the_upgrade_is_a_dial_failure(tmp_path: Path) -> None:
    # A stopping node answers a websocket upgrade with 503 (Runtime._on_request); the
    # dialler retries it like any dial that failed, and does not log a connection that
    # raised (`dwcp bench soak` saw `connection_failed` at every peer of a SIGTERM'd node).
    from trio_websocket import WebSocketRequest, serve_websocket

    mesh = Mesh(2, tmp_path)
    dialler = mesh.runtime("dc1")
    rejected = 0

    async def stopping(request: WebSocketRequest) -> None:
        nonlocal rejected
        rejected += 1
        await request.reject(503)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_websocket, stopping, "127.0.0.1", mesh.ports["dc2"], None)
        await nursery.start(dialler.run)
        await wait_until(lambda: dialler.counters.get("dial_failures", 0) >= 2,
                         "two refused dials counted as dial failures")
        events = [e["event"] for e in mesh.events("dc1")]
        assert "dial_failed" in events and "connection_failed" not in events, events
        assert rejected >= 2 and dialler.counters.get("connection_failed", 0) == 0
        dialler.shutdown()
        nursery.cancel_scope.cancel()
