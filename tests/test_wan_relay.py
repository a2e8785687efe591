"""The WAN delay relay of ``make netns-chaos-wan`` (bench.wan_relay) over loopback: each
direction delayed by its latency, bytes in order and whole under jitter, a half-close
kept, a bounded buffer that holds the sender back, and a relay process killed and
restarted (no namespaces needed)."""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from bench.netns_wan import LATENCY_MS, routes, view
from bench.wan_relay import CHUNK, DelayPipe, Relay, Route, RouteError, parse_route
from federation import config
from federation.cli.keys import init_federation
from federation.config_print import federation_print

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _upstream(nursery: trio.Nursery,
                    handler: Callable[[trio.SocketStream], Awaitable[object]]) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, handler, listeners)
    return int(listeners[0].socket.getsockname()[1])


async def _relay(nursery: trio.Nursery, upstream: int, ms: float, jitter: float = 0.0,
                 limit: int = 4 << 20, seed: int = 1) -> tuple[Relay, int]:
    relay = Relay([parse_route(f"127.0.0.1:0=127.0.0.1:{upstream}@{ms}", jitter)], seed, limit)
    (port,) = await nursery.start(relay.serve)
    return relay, port


async def _receive_all(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(1 << 16):
        out += data
    return bytes(out)


def test_each_direction_waits_its_latency_and_a_half_close_is_kept() -> None:
    """An echo server behind a 150 ms relay: the answer comes 2 x 150 ms after the
    request, the client's end of stream reaches the server (which then still answers)."""

    async def echo(stream: trio.SocketStream) -> None:
        got = await _receive_all(stream)  # until the client's half-close
        await stream.send_all(got[::-1])
        await stream.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, port = await _relay(nursery, await _upstream(nursery, echo), 150)
            direct = await trio.open_tcp_stream("127.0.0.1", port)
            began = trio.current_time()
            await direct.send_all(b"hello across the ocean")
            await direct.send_eof()
            answer = await _receive_all(direct)
            took = trio.current_time() - began
            assert answer == b"naeco eht ssorca olleh"
            assert took >= 0.3, f"round trip {took:.3f} s through a 150 ms relay"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_bytes_arrive_whole_and_in_order_under_heavy_jitter() -> None:
    """Jitter as large as the latency, many small writes: the upstream gets every byte in
    the order sent (each chunk waits for the one before it)."""
    got: list[bytes] = []

    async def sink(stream: trio.SocketStream) -> None:
        got.append(await _receive_all(stream))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            relay, port = await _relay(nursery, await _upstream(nursery, sink), 20, jitter=1.0)
            rng = random.Random(5)
            sent = bytearray()
            client = await trio.open_tcp_stream("127.0.0.1", port)
            for i in range(300):
                piece = f"{i:05d}:".encode() + rng.randbytes(rng.randrange(1, 3000))
                sent += piece
                await client.send_all(piece)
                if i % 7 == 0:
                    await trio.sleep(0.001)  # let the relay read pieces apart
            await client.aclose()
            while not got:
                await trio.sleep(0.01)
            assert got[0] == bytes(sent)
            assert relay.pipes[0].jitter_s == pytest.approx(0.02)
            nursery.cancel_scope.cancel()

    trio.run(main)


@given(st.lists(st.floats(0, 10), min_size=1, max_size=50), st.integers(0, 2**32))
def test_release_times_never_go_back(steps: list[float], seed: int) -> None:
    pipe = DelayPipe(0.1, 0.1, random.Random(seed))
    now, last = 0.0, 0.0
    for step in steps:
        now += step
        at = pipe.release_time(now)
        assert at >= last and at >= now
        last = at


def test_a_full_relay_stops_reading_and_the_sender_waits() -> None:
    """An upstream that reads nothing at first: the relay holds at most ``limit`` bytes
    and the client's send cannot finish (back-pressure); once the upstream reads, every
    byte arrives, in order."""
    limit = 256 << 10
    payload = random.Random(9).randbytes(64 << 20)  # far more than the kernels' buffers
    reading = trio.Event()
    got: list[bytes] = []
    done: list[bool] = []

    async def slow(stream: trio.SocketStream) -> None:
        await reading.wait()
        got.append(await _receive_all(stream))

    async def send(port: int) -> None:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(payload)
        done.append(True)
        await client.aclose()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            relay, port = await _relay(nursery, await _upstream(nursery, slow), 5, limit=limit)
            nursery.start_soon(send, port)
            while not relay.pipes or relay.pipes[0].held.bytes < limit - CHUNK:
                await trio.sleep(0.01)
            assert not done, "the sender finished though the upstream read nothing"
            assert relay.pipes[0].peak <= limit
            reading.set()
            while not got:
                await trio.sleep(0.01)
            assert done and relay.pipes[0].peak <= limit
            assert hashlib.sha256(got[0]).digest() == hashlib.sha256(payload).digest()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_unreachable_upstream_resets_the_client() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            _, port = await _relay(nursery, _free_port(), 10)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises(trio.BrokenResourceError):
                while await client.receive_some(100):
                    pass
                raise trio.BrokenResourceError("an end of stream, not a reset")
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("bad", ["127.0.0.1:1", "a=b@1", "127.0.0.1:1=127.0.0.1:x@1",
                                 "127.0.0.1:1=127.0.0.1:2@soon", "127.0.0.1:1=127.0.0.1:2@-4",
                                 ":1=127.0.0.1:2@1", "127.0.0.1:70000=127.0.0.1:2@1"])
def test_a_bad_route_names_itself(bad: str) -> None:
    with pytest.raises(RouteError, match="--route"):
        parse_route(bad)


@given(st.text(max_size=60))
def test_any_route_text_parses_or_is_a_route_error(text: str) -> None:
    try:
        route = parse_route(text, 0.02)
    except RouteError:
        return
    assert isinstance(route, Route) and route.latency_s >= 0


def _start_relay(listen: int, upstream: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.wan_relay", "--seed", "3",
         "--route", f"127.0.0.1:{listen}=127.0.0.1:{upstream}@30"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _echo_once(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"ping")
        return s.recv(100)


def _upper_server(server: socket.socket) -> None:
    """Answer each connection's first read upper-cased, until ``server`` is closed."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            try:
                conn.sendall(conn.recv(100).upper())
            except OSError:
                pass  # the relay went away mid-way: the next connection


def test_a_killed_relay_process_cuts_the_link_until_it_is_restarted() -> None:
    """``kill -9`` of the relay: an open connection through it ends, new ones are refused;
    a relay started again on the same port carries connections again."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        threading.Thread(target=_upper_server, args=(server,), daemon=True).start()
        upstream, listen = server.getsockname()[1], _free_port()
        relay = _start_relay(listen, upstream)
        try:
            assert _echo_once(listen) == b"PING"
            held = socket.create_connection(("127.0.0.1", listen), timeout=10)
            relay.send_signal(signal.SIGKILL)
            relay.wait()
            with held:
                try:
                    assert held.recv(100) == b""
                except ConnectionResetError:
                    pass  # a reset is as good as an end: the connection is gone
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", listen), timeout=10)
            relay = _start_relay(listen, upstream)
            assert _echo_once(listen) == b"PING"
        finally:
            relay.kill()
            relay.wait()
            assert relay.stdout is not None
            relay.stdout.close()


def test_a_dcs_view_sends_its_peers_through_its_relay_and_keeps_the_digest(
        tmp_path: Path) -> None:
    cfg = init_federation(tmp_path / "fed", 4, host="10.215.9.254", base_port=7100,
                          hosts={f"dc{i}": f"10.215.9.{i}" for i in range(1, 5)})
    mine = config.load(view(cfg, "dc2"))
    assert federation_print(mine).digest == federation_print(config.load(cfg)).digest
    assert str(mine.dc("dc2").control) == "10.215.9.2:7102"  # its own: where it listens
    assert str(mine.dc("dc3").control) == "127.0.0.1:7103"  # a peer: its relay
    assert str(mine.dc("dc3").data) == "127.0.0.1:7203"
    assert str(mine.dc("dc3").api) == "10.215.9.3:7303"  # the harness's way in: direct
    assert sorted(routes(cfg, "dc2")) == sorted(
        f"127.0.0.1:{p}=10.215.9.{i}:{p}@{LATENCY_MS[('dc2', f'dc{i}')]:g}"
        for i in (1, 3, 4) for p in (7100 + i, 7200 + i))
    assert all(10 <= ms <= 150 for ms in LATENCY_MS.values()) and len(LATENCY_MS) == 12
