"""AMST's sans-I/O cores over a modelled wide-area path, on the simulator's clock.

``PathModel`` is a deterministic fluid model of N TCP connections sharing one
bottleneck (5 ms steps). ``sim``'s links serialise frames at a bandwidth but do not
model TCP's per-connection window, and that window is exactly what makes more streams
pay on a long fat path. Here every stream is a TCP connection whose rate is
``min(cwnd / RTT, fair share of the bottleneck)``, cwnd starting at 10 segments
(RFC 6928) and doubling per RTT up to ``STREAM_WINDOW_BYTES``; a connection takes one
RTT to establish and one more for the channel handshake and the receiver's first Ack;
a chunk reaches the receiver half an RTT after its last byte leaves, and its Ack comes
back half an RTT later.

Scenario ``amst-streams`` steps the model from the World's event heap, cuts a stream at
a seeded time, checks after every step that no chunk is delivered twice and the window
holds, and in the quiet phase requires the transfer to finish with every chunk::

    dwcp sim run amst-streams --seed 3 --param mode=internet --param rtt=0.1 \
        --param bandwidth=1.25e8 --param chunks=1500
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from mesh.amst.policy import STREAM_WINDOW_BYTES
from mesh.amst.receiver import (
    AckArrived,
    AmstReceiver,
    Chunk,
    ChunkArrived,
    Deliver,
    Reply,
    StreamDown,
    StreamUp,
)
from mesh.amst.sender import (
    AmstSender,
    ChunkOffered,
    ChunkWritten,
    CloseStream,
    Finish,
    OpenStream,
    SourceDone,
    Transmit,
)
from mesh.core import CancelTimer, SetTimer, TimerFired
from sim.scenario import Run, scenario
from sim.world import World

__all__ = ["PathModel", "STEP"]

MiB = 1024 * 1024
STEP = 0.005
IW = 10 * 1448  # RFC 6928 initial window


class PathModel:
    def __init__(self, mode: str, bandwidth: float, rtt: float, chunks: int) -> None:
        self.bandwidth, self.rtt, self.total = bandwidth, rtt, chunks
        self.transfer = bytes(16)
        self.sender = AmstSender(self.transfer, mode=mode)
        self.receiver = AmstReceiver(self.transfer)
        self.now = 0.0
        self.heap: list[tuple[float, int, Any]] = []
        self.seq = itertools.count()
        self.timers: dict[Any, float] = {}
        self.cwnd: dict[int, float] = {}
        self.writing: dict[int, tuple[int, float]] = {}  # stream -> (chunk, bytes left)
        self.up: set[int] = set()
        self.synced: set[int] = set()
        self.next_chunk = 0
        self.delivered: list[int] = []
        self.finished = False
        self.streams_over_time: list[tuple[float, int]] = []
        self.rate_over_time: list[tuple[float, float]] = []
        self._sent_bytes = 0.0
        self.apply(self.sender.start(0.0))

    def later(self, delay: float, what: Any) -> None:
        heapq.heappush(self.heap, (self.now + delay, next(self.seq), what))

    def apply(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, OpenStream):
                self.later(2 * self.rtt, ("connected", a.stream))
            elif isinstance(a, Transmit):
                assert a.stream not in self.writing
                self.writing[a.stream] = (a.chunk, MiB)
            elif isinstance(a, CloseStream):
                self.close(a.stream)
            elif isinstance(a, SetTimer):
                self.timers[a.key] = a.at
            elif isinstance(a, CancelTimer):
                self.timers.pop(a.key, None)
            elif isinstance(a, Finish):
                self.finished = True

    def close(self, s: int) -> None:
        self.up.discard(s)
        self.writing.pop(s, None)
        self.cwnd.pop(s, None)
        self.receiver.handle(self.now, StreamDown(s))

    def cut(self, s: int) -> None:
        """The connection dies (RST): whatever it had in flight is lost."""
        self.close(s)
        self.apply(self.sender.handle(self.now, StreamDown(s)))

    def feed_receiver(self, s: int, event: Any) -> None:
        for a in self.receiver.handle(self.now, event):
            if isinstance(a, Deliver):
                self.delivered.append(a.chunk)
            elif isinstance(a, Reply):
                self.later(self.rtt / 2, ("ack", s, a.message))

    def step(self) -> None:
        self.now += STEP
        while self.heap and self.heap[0][0] <= self.now:
            _, _, what = heapq.heappop(self.heap)
            kind, s = what[0], what[1]
            if kind == "connected":
                self.up.add(s)
                self.cwnd[s] = IW
                self.feed_receiver(s, StreamUp(s))
            elif kind == "chunk" and s in self.up:
                self.feed_receiver(s, ChunkArrived(s, what[2], True))
            elif kind == "ack" and s in self.up:
                if s not in self.synced:
                    self.synced.add(s)
                    self.apply(self.sender.handle(self.now, StreamUp(s)))
                self.apply(self.sender.handle(self.now, AckArrived(s, what[2])))
        for key, at in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if at <= self.now and self.timers.get(key) == at:
                del self.timers[key]
                self.apply(self.sender.handle(self.now, TimerFired(key)))
        while self.next_chunk < self.total and self.sender.room() >= MiB:
            self.apply(self.sender.handle(self.now, ChunkOffered(self.next_chunk, MiB)))
            self.next_chunk += 1
            if self.next_chunk == self.total:
                self.apply(self.sender.handle(self.now, SourceDone()))
        self.transmit()
        self.streams_over_time.append((self.now, len(self.up)))

    def transmit(self) -> None:
        """Max-min fair share of the bottleneck among writing streams, each capped by
        its congestion window per RTT."""
        active = sorted(s for s in self.writing if s in self.up)
        caps = {s: min(self.cwnd[s], STREAM_WINDOW_BYTES) / self.rtt for s in active}
        rates: dict[int, float] = {}
        left, todo = self.bandwidth, sorted(active, key=lambda s: caps[s])
        while todo:
            share = left / len(todo)
            s = todo.pop(0)
            rates[s] = min(caps[s], share)
            left -= rates[s]
        sent = 0.0
        for s in active:
            chunk, remaining = self.writing[s]
            remaining -= rates[s] * STEP
            sent += rates[s] * STEP
            self.cwnd[s] = min(STREAM_WINDOW_BYTES, self.cwnd[s] * 2 ** (STEP / self.rtt))
            if remaining > 0:
                self.writing[s] = (chunk, remaining)
                continue
            del self.writing[s]
            msg = Chunk(chunk, bytes(32), b"")
            self.later(self.rtt / 2, ("chunk", s, msg))
            self.apply(self.sender.handle(self.now, ChunkWritten(s, chunk)))
        self.rate_over_time.append((self.now, sent / STEP))

    def run(self, until: float, cut: tuple[float, int] | None = None) -> None:
        while not self.finished and self.now < until:
            if cut is not None and self.now >= cut[0]:
                self.cut(cut[1])
                cut = None
            self.step()

    def mean_rate(self, start: float, end: float) -> float:
        window = [r for t, r in self.rate_over_time if start <= t < end]
        return sum(window) / len(window)


@scenario("amst-streams", nodes=2, faults_until=10.0, quiet=120.0, swarm_kinds=(),
          description="AMST over a modelled long fat path: streams follow the BDP, a cut "
                      "stream's chunks go to the others")  # fmt: skip
def amst_streams(run: Run) -> None:
    mode = run.param("mode", "hybrid")
    bandwidth = float(run.param("bandwidth", 500e6))  # bytes/s: 4 Gbit/s
    rtt = float(run.param("rtt", 0.05))
    chunks = int(run.param("chunks", 6000))
    path = PathModel(mode, bandwidth, rtt, chunks)
    cut_at = run.rng.uniform(2.0, run.faults_until - 1.0)
    state: dict[str, int | None] = {"cut": None}

    def tick(world: World) -> None:
        path.now = world.now - STEP  # step() advances by one STEP to world.now
        path.step()
        if not path.finished:  # the label carries the state, so the trace hash follows it
            world.after(STEP, tick, f"amst step {len(path.delivered)}/{len(path.up)}")

    def cut(world: World) -> None:
        if path.up and not path.finished:
            victim = run.rng.choice(sorted(path.up))
            state["cut"] = victim
            path.cut(victim)

    def exactly_once(world: World) -> str | None:
        if len(path.delivered) != len(set(path.delivered)):
            return "a chunk was delivered twice"
        if path.sender.in_flight > path.sender.window:
            return f"window exceeded: {path.sender.in_flight} > {path.sender.window}"
        return None

    run.world.at(STEP, tick, "amst step")
    run.world.at(cut_at, cut, "amst cut a stream")
    run.add_checker("amst-exactly-once-and-window", exactly_once)
    run.liveness(
        "every chunk delivered",
        lambda w: path.finished and sorted(path.delivered) == list(range(chunks)),
    )
    run.metric("amst_streams_final", lambda w: path.sender.controller.target)
    run.metric("amst_streams_max_up", lambda w: path.sender.max_streams_up)
    run.metric("amst_cut_stream", lambda w: state["cut"])
    run.metric("amst_resent", lambda w: path.sender.resent)
    run.metric("amst_finished_at", lambda w: round(path.now, 3) if path.finished else None)
