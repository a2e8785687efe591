"""Two small real protocol cores the simulator's own scenarios and benchmark run.

* :class:`CounterCore`: a replicated grow-only counter (a G-Counter CRDT, Shapiro et
  al., "Conflict-free Replicated Data Types", SSS 2011) spread by push-pull gossip,
  with a heartbeat failure detector. An increment is acknowledged only after its
  synced write, so a crash never loses an acknowledged increment.
* :class:`EchoCore`: pings every peer and reports round-trip times measured on its
  own clock (so a clock offset does not bend them).

They are sans-I/O exactly as the mesh and consensus cores are, and exist so the
simulator is exercised end to end (wire encoding, timers, storage, faults) by
code it does not special-case.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from mesh import wire
from mesh.core import (
    Action,
    Event,
    Notify,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    SetTimer,
    Store,
    TimerFired,
)
from mesh.wire import U64, Bool, Bytes, Float, MapOf, Text, field

__all__ = ["CounterState", "EchoPing", "EchoPong", "CounterCore", "EchoCore"]

MAX_NAME = 64
MAX_NODES = 256


@wire.message("sim.counter.state")
class CounterState:
    """A node's view of every counter. ``digest`` (BLAKE2b-128 of the counts) catches frames
    corrupted in flight that still decode: the real mesh gets that from its AEAD channel,
    the simulator carries plain frames."""

    origin: str = field(Text(MAX_NAME))
    counts: tuple[tuple[str, int], ...] = field(MapOf(Text(MAX_NAME), U64(), MAX_NODES))
    reply: bool = field(Bool())
    digest: bytes = field(Bytes(16, exact=True))


def counts_digest(origin: str, counts: tuple[tuple[str, int], ...]) -> bytes:
    text = origin + "\x00" + ";".join(f"{k}={v}" for k, v in counts)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@wire.message("sim.echo.ping")
class EchoPing:
    seq: int = field(U64())
    sent_at: float = field(Float())


@wire.message("sim.echo.pong")
class EchoPong:
    seq: int = field(U64())
    sent_at: float = field(Float())


#: Gossip period of memberlist's LAN profile (GossipInterval = 200 ms) scaled to
#: 1 s, memberlist's WAN profile (GossipInterval = 500 ms ... ProbeInterval = 5 s).
GOSSIP_INTERVAL = 1.0
#: Peers per round: memberlist's GossipNodes default (3), minus one for small clusters.
#: One of them is the next peer of a round-robin over all peers (SWIM's round-robin probe
#: order, Das et al. DSN 2002 §4.3), so every peer hears from us every len(peers) rounds.
FANOUT = 2
#: A peer unheard for this long is suspected: at least two full round-robin cycles (one
#: lost message is tolerated), and never less than 10 s (twice memberlist's WAN
#: ProbeInterval of 5 s).
SUSPECT_AFTER = 10.0
COUNT_KEY = "counter/value"


class CounterCore:
    def __init__(self, name: str, peers: Sequence[str], rng: random.Random, store: Store,
                 interval: float = GOSSIP_INTERVAL, fanout: int = FANOUT,
                 suspect_after: float = SUSPECT_AFTER) -> None:
        self.name = name
        self.peers = sorted(p for p in peers if p != name)
        self.rng = rng
        self.store = store
        self.interval = interval
        self.fanout = fanout
        self.suspect_after = max(suspect_after, 2.0 * len(self.peers) * interval)
        self._next = 0
        stored = store.get(COUNT_KEY)
        self.counts: dict[str, int] = {name: int(stored.decode()) if stored else 0}
        self.last_heard: dict[str, float] = {}
        self.suspected: set[str] = set()
        self.connected: set[str] = set()

    @property
    def value(self) -> int:
        return sum(self.counts.values())

    def start(self, now: float) -> list[Action]:
        self.last_heard = {p: now for p in self.peers}
        return [Notify("started", self.counts[self.name]),
                SetTimer("gossip", now + self.rng.uniform(0.0, self.interval))]

    def increment(self, now: float, amount: int = 1) -> list[Action]:
        """A client's increment: durable (synced) before it is acknowledged."""
        if amount <= 0:
            raise ValueError(f"increment amount must be positive, got {amount}")
        value = self.counts[self.name] + amount
        self.counts[self.name] = value
        return [Persist(COUNT_KEY, str(value).encode(), sync=True), Notify("ack", value)]

    def _state(self, reply: bool) -> CounterState:
        counts = tuple(sorted(self.counts.items()))
        return CounterState(self.name, counts, reply, counts_digest(self.name, counts))

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Received):
            return self._on_state(now, event.peer, event.message)
        if isinstance(event, TimerFired) and event.key == "gossip":
            return self._gossip(now)
        if isinstance(event, PeerUp):
            self.connected.add(event.peer)
        elif isinstance(event, PeerDown):
            self.connected.discard(event.peer)
        return []

    def _gossip(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for peer in self.peers:
            if peer not in self.suspected and now - self.last_heard[peer] > self.suspect_after:
                self.suspected.add(peer)
                actions.append(Notify("suspect", peer))
        if self.peers:
            state = self._state(reply=False)
            turn = self.peers[self._next % len(self.peers)]
            self._next += 1
            others = [p for p in self.peers if p != turn]
            chosen = self.rng.sample(others, min(self.fanout - 1, len(others)))
            for peer in [turn, *chosen]:
                actions.append(Send(peer, state))
        actions.append(SetTimer("gossip", now + self.interval))
        return actions

    def _on_state(self, now: float, peer: str, msg: object) -> list[Action]:
        if (not isinstance(msg, CounterState) or peer not in self.last_heard
                or msg.digest != counts_digest(msg.origin, msg.counts)):
            return [Notify("rejected", peer)]
        actions: list[Action] = []
        self.last_heard[peer] = now
        if peer in self.suspected:
            self.suspected.discard(peer)
            actions.append(Notify("alive", peer))
        theirs = dict(msg.counts)
        for origin, count in msg.counts:
            if origin != self.name and count > self.counts.get(origin, 0):
                self.counts[origin] = count
                actions.append(Notify("learned", (origin, count)))
        behind = any(theirs.get(o, 0) < c for o, c in self.counts.items())
        if behind and not msg.reply:
            actions.append(Send(peer, self._state(reply=True)))
        return actions


#: Ping period: the 1 s probe interval of memberlist's LAN profile (ProbeInterval).
PING_INTERVAL = 1.0


class EchoCore:
    def __init__(self, name: str, peers: Sequence[str], interval: float = PING_INTERVAL) -> None:
        self.name = name
        self.peers = sorted(p for p in peers if p != name)
        self.interval = interval
        self.seq = 0
        self.rtt: dict[str, float] = {}

    def start(self, now: float) -> list[Action]:
        return [SetTimer("ping", now + self.interval)]

    def handle(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, TimerFired):
            self.seq += 1
            ping = EchoPing(self.seq, now)
            out: list[Action] = [Send(p, ping) for p in self.peers]
            out.append(SetTimer("ping", now + self.interval))
            return out
        if isinstance(event, Received):
            msg = event.message
            if isinstance(msg, EchoPing):
                return [Send(event.peer, EchoPong(msg.seq, msg.sent_at))]
            if isinstance(msg, EchoPong) and msg.sent_at <= now:
                self.rtt[event.peer] = now - msg.sent_at
                return [Notify("rtt", (event.peer, now - msg.sent_at))]
        return []
