"""A userspace WAN delay for ``make netns-chaos-wan``: a TCP relay that holds every byte
for a one-way latency (plus seeded jitter) in each direction, because this kernel has no
netem (issue 18, item 1).

``python -m bench.wan_relay --route LISTEN=UPSTREAM@MS ...`` runs in a DC's network
namespace: for each route it listens on ``LISTEN`` (``127.0.0.1:PORT``: the address the
DC's own federation file gives a peer's endpoint) and forwards every connection to
``UPSTREAM`` (the peer's real endpoint across the shaped link), so a relay delays what
its DC sends and what it gets back on the connections that DC opened; the peer still
sees the DC's own address as the source (its per-source handshake caps count DCs, not
one relay). It prints ``ready`` once every route listens.

Per connection and direction (:class:`DelayPipe`): a chunk read at time t is written at
``max(t + latency + jitter, the previous chunk's time)``, so jitter never reorders a
stream (TCP does not either); at most ``limit`` bytes wait in the relay, and while they
do it stops reading, so the sender's TCP window closes: back-pressure, not an unbounded
buffer. An end of stream is delayed like data (a half-close stays a half-close); a
reset or error on either side closes both with a reset. The jitter of connection k of
a route comes from ``Random(f"{seed}:{listen}:{k}:{direction}")``: a function of the
seed (the order connections arrive in is the processes' own timing).

Not modelled: the connection handshake (the client's ``connect`` completes locally; its
first bytes, and the upstream's refusal, arrive a latency later) and loss (the tbf links
beneath drop what overflows them).
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
from collections import deque

import attrs
import trio

#: Bytes one direction of one connection may hold: 4 MiB is 2.5 times the
#: bandwidth-delay product of the fastest, longest link of ``make netns-chaos-wan``
#: (100 Mbit/s x 118 ms = 1.5 MB), so the relay never caps a link's throughput below
#: its tbf rate, and small enough that 3 peers x 2 endpoints x a few connections fit.
LIMIT = 4 << 20
#: One read: 64 KiB, the largest segment veth hands over with GSO.
CHUNK = 64 << 10
#: How long a relay tries to reach an upstream before it resets the client: TCP's own
#: SYN retries take ~2 min (tcp_syn_retries 6); a node's handshake gives up well before.
CONNECT_S = 30.0
#: How many pipes :attr:`Relay.pipes` keeps for inspection.
PIPES_KEPT = 64


class RouteError(ValueError):
    """A ``--route`` argument does not parse (the message names it)."""


@attrs.frozen
class Route:
    listen: tuple[str, int]
    upstream: tuple[str, int]
    latency_s: float
    #: standard deviation of the one-way delay, seconds
    jitter_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        if not self.latency_s >= 0 or not self.jitter_s >= 0:
            raise RouteError(f"route {self.listen}: latency {self.latency_s} and jitter "
                             f"{self.jitter_s} must be >= 0")


def _endpoint(text: str, what: str, route: str, lowest: int = 1) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not lowest <= int(port) < 65536:
        raise RouteError(f"--route {route!r}: {what} {text!r} is not HOST:PORT")
    return host, int(port)


def parse_route(text: str, jitter_fraction: float = 0.0) -> Route:
    """``LISTEN=UPSTREAM@MS``: listen on LISTEN (port 0: any free one), forward to
    UPSTREAM, MS milliseconds each way (jitter: ``jitter_fraction`` of it, as a standard
    deviation)."""
    listen, eq, rest = text.partition("=")
    upstream, at, ms = rest.partition("@")
    if not eq or not at:
        raise RouteError(f"--route {text!r}: LISTEN=UPSTREAM@MS")
    try:
        latency = float(ms) / 1000
    except ValueError:
        raise RouteError(f"--route {text!r}: latency {ms!r} is not a number of ms") from None
    if not 0 <= latency < 60:
        raise RouteError(f"--route {text!r}: latency {ms} ms is not in 0-60000")
    return Route(_endpoint(listen, "listen address", text, lowest=0),  # 0: any free port
                 _endpoint(upstream, "upstream address", text), latency,
                 latency * jitter_fraction)


class _Held:
    """The bytes one direction holds; :meth:`room` waits while more would pass ``limit``
    (a chunk alone is always let in, however large)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._freed = trio.Event()

    async def room(self, n: int) -> None:
        while self.bytes and self.bytes + n > self.limit:
            if self._freed.is_set():
                self._freed = trio.Event()
            await self._freed.wait()
        self.bytes += n

    def free(self, n: int) -> None:
        self.bytes -= n
        self._freed.set()


class DelayPipe:
    """One direction of one relayed connection (see the module's docstring)."""

    def __init__(self, latency_s: float, jitter_s: float, rng: random.Random,
                 limit: int = LIMIT) -> None:
        self.latency_s, self.jitter_s, self.rng = latency_s, jitter_s, rng
        self.held = _Held(limit)
        self._last = 0.0
        #: the most bytes held at once: what the tests read to see the bound hold
        self.peak = 0

    def release_time(self, now: float) -> float:
        delay = self.latency_s + (self.rng.gauss(0.0, self.jitter_s) if self.jitter_s else 0.0)
        self._last = max(now + max(delay, 0.0), self._last)
        return self._last

    async def run(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        """Copy ``src`` to ``dst`` delayed, until ``src`` ends (then ``dst`` gets the end
        of stream, delayed too); a transport error propagates (the caller resets both)."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](float("inf"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, receive, dst)
            async with send:
                while True:
                    data = await src.receive_some(CHUNK)
                    await self.held.room(len(data))
                    self.peak = max(self.peak, self.held.bytes)
                    await send.send((self.release_time(trio.current_time()), data))
                    if not data:
                        break

    async def _write(self, receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
                     dst: trio.SocketStream) -> None:
        async with receive:
            async for at, data in receive:
                await trio.sleep_until(at)
                if not data:
                    await dst.send_eof()
                    self.held.free(0)
                    return
                await dst.send_all(data)
                self.held.free(len(data))


def _reset(stream: trio.SocketStream) -> None:
    """Close with a reset (SO_LINGER 0), as a broken path looks to the other end."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already gone
    stream.socket.close()


class Relay:
    """Every route of one relay process; :meth:`serve` runs them until cancelled."""

    def __init__(self, routes: list[Route], seed: int, limit: int = LIMIT) -> None:
        self.routes = routes
        self.seed = seed
        self.limit = limit
        self.accepted: dict[tuple[str, int], int] = {r.listen: 0 for r in routes}
        #: the last pipes made (the tests read their peaks); bounded: a relay lives as
        #: long as its seed and its DC's nodes open connections again and again
        self.pipes: deque[DelayPipe] = deque(maxlen=PIPES_KEPT)

    def _pipe(self, route: Route, k: int, direction: str) -> DelayPipe:
        rng = random.Random(f"{self.seed}:{route.listen[0]}:{route.listen[1]}:{k}:{direction}")
        pipe = DelayPipe(route.latency_s, route.jitter_s, rng, self.limit)
        self.pipes.append(pipe)
        return pipe

    async def serve(self, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Listen on every route (started: the ports bound, in route order), then relay."""
        listeners = []
        for route in self.routes:
            host, port = route.listen
            listeners.append((route, (await trio.open_tcp_listeners(port, host=host))[0]))
        async with trio.open_nursery() as nursery:
            for route, listener in listeners:
                nursery.start_soon(trio.serve_listeners,
                                   lambda s, route=route: self._connection(route, s),
                                   [listener])
            task_status.started([lst.socket.getsockname()[1] for _, lst in listeners])

    async def _connection(self, route: Route, client: trio.SocketStream) -> None:
        k = self.accepted[route.listen]
        self.accepted[route.listen] = k + 1
        upstream: trio.SocketStream | None = None
        with trio.move_on_after(CONNECT_S):
            try:
                upstream = await trio.open_tcp_stream(*route.upstream)
            except OSError:
                pass  # refused or unreachable: the client gets a reset, as it would direct
        if upstream is None:
            _reset(client)
            return
        out, back = self._pipe(route, k, "out"), self._pipe(route, k, "back")
        broken = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.run, client, upstream)
                nursery.start_soon(back.run, upstream, client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            broken = True  # one side reset or failed: both get a reset
        if broken:
            _reset(client)
            _reset(upstream)
        else:
            await client.aclose()
            await upstream.aclose()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wan_relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--route", action="append", required=True, metavar="LISTEN=UPSTREAM@MS",
                   help="listen on LISTEN, forward to UPSTREAM, MS ms each way (repeatable)")
    p.add_argument("--jitter", type=float, default=0.02,
                   help="jitter's standard deviation as a fraction of the latency "
                   "(default 0.02, sim/geo.py's JITTER_FRACTION)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=LIMIT,
                   help=f"bytes one direction of a connection may hold (default {LIMIT})")
    args = p.parse_args(argv)
    if not 0 <= args.jitter <= 1:
        p.error(f"--jitter {args.jitter}: a fraction in 0-1")
    if args.limit < 1:
        p.error(f"--limit {args.limit}: at least 1 byte")
    try:
        routes = [parse_route(r, args.jitter) for r in args.route]
    except RouteError as exc:
        p.error(str(exc))
    relay = Relay(routes, args.seed, args.limit)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.serve)
            print("ready", flush=True)

    trio.run(run)


if __name__ == "__main__":
    main()
