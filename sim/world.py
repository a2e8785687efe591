'''The simulated world: a virtual clock, an event heap, nodes hosting sans-I/O cores.

This is the host API that protocol cores (gossip, PBFT, migration) plug into.
A simulated node holds the same core objects a real node runs
(``handle(now, event) -> list[Action]``, see :mod:`mesh.core`); the world
delivers their events and executes their actions. One seed drives every
random choice, so a run replays exactly.

Building a world
----------------
::

    from sim import World, LinkSpec, Normal
    from sim.geo import geo_links

    world = World(seed=7)                    # virtual clock starts at 0.0 s
    names = ["a", "b", "c"]

    def build(node):                         # called at start and at every restart
        peers = [n for n in names if n != node.name]
        node.mount("swim", Membership(node.name, peers, node.rng("swim")),
                   accepts=("swim.",))                     # wire-tag prefixes ...
        node.mount("pbft", Replica(node.name, ..., store=node.store),
                   accepts=(PrePrepare, Prepare, Commit))  # ... or message classes

    for name in names:
        world.add_node(name, build)          # build(node) runs now; start(now) at t=now
    world.set_links(geo_links(names))        # inter-region RTTs, sim/geo.py
    world.set_link("a", "b", LinkSpec(latency=Normal(0.040, 0.004), bandwidth=1e9))
    world.run(until=60.0)                    # or world.run(until=..., predicate=fn(world))

List the federation's names in a closure (as above) rather than reading
``world.node_names()`` inside ``build``: at the first ``add_node`` it holds only the
nodes added so far.

Nodes and cores
---------------
* ``world.add_node(name, build)`` creates a :class:`SimNode` and calls
  ``build(node)`` at once, so the cores exist as soon as ``add_node`` returns
  (``world.nodes[name].core("gossip")``). ``build`` mounts one or more cores with
  ``node.mount(name, core, accepts=...)``; ``accepts`` lists message classes or
  wire-tag prefixes (strings): a received message goes to the core that accepts
  its type. A message no core accepts is counted (``undeliverable``) and dropped.
* Give a core ``node.rng(name)`` for randomness (seeded from the world seed, the
  node, the name and the node's incarnation) and ``node.store`` for durability
  (a :class:`sim.store.SimStore`, the :class:`mesh.core.Store` interface; share
  it between cores by prefixing keys with the core's name).
* If a core has a ``start(now) -> list[Action]`` method, it is called when the
  node starts (at the time it was added, and at every restart). Use it to set
  the first timers.
* ``now`` is the node's local clock: virtual time plus the node's clock offset
  (``node.clock_offset``, set by the nemesis). ``SetTimer(key, at)`` takes ``at``
  on that same local clock. Timer keys must be plain values (str, int, tuples of
  them): their repr goes into the trace hash. A timer belongs to the core that set
  it; setting a key again replaces it.
* ``Send(peer, msg)``: ``msg`` is encoded with ``mesh.wire.encode`` and the bytes
  cross the simulated link; the receiver decodes them with ``mesh.wire.decode`` and
  gets ``Received(peer=sender, message=msg, raw=bytes)``. A frame that fails to
  decode (a corrupted frame) is counted in ``decode_errors`` and dropped. With
  ``world.decode_frames = False`` an untampered frame carries the sent message object
  to the receiver (same bytes, sizes and trace; the decode is skipped). A send
  to a name that is not a node is counted (``unknown_peer``) and dropped.
* ``Persist(key, value, sync)`` writes to ``node.store``; only synced writes (and
  every write before a synced one) survive a crash. A crash may come right after a
  synced write, in the middle of a step (``SimStore.after_sync``, the crash-point
  search): the actions after that write are then not executed, as on a real node
  whose process dies as its fsync returns.
* ``Offload(key, work)``: ``work()`` runs at once (it is a pure function of what it
  was given) and its outcome reaches the core as ``Offloaded(key, result, error)``
  ``world.offload_delay`` seconds later, as a worker thread's would, with other events
  before it; a crash in between loses it, as it would a thread's.
* ``PeerUp(peer)`` / ``PeerDown(peer)`` model the authenticated control
  connection: up ``peer_up_after`` seconds after both ends are up and no
  direction between them is blocked, down ``peer_down_after`` seconds after that
  stops being true. ``World(connection_events=False)`` turns them off.
* A crash (``world.crash(name)``) throws away the node's cores and timers and the
  store's unsynced writes; messages arriving while it is down are dropped.
  ``world.restart(name)`` calls ``build(node)`` again with the same store (so the
  cores rebuild from what survived) and a fresh incarnation.
* Workloads drive cores from outside with ``world.invoke(node, core, fn, label)``:
  ``fn(core, now)`` returns actions, which the world executes (``False`` if the
  node is down). Schedule anything with ``world.at(t, fn, label)`` /
  ``world.after(dt, fn, label)``; ``fn(world)`` runs at that virtual time.

Faults
------
Scenarios schedule faults with :class:`sim.nemesis.Nemesis` (``run.nemesis``), which
heals them all before the quiet phase. Underneath are the world's primitives:
``world.block(pairs) -> token`` / ``world.unblock(token)`` (directed pairs, shapes in
:mod:`sim.partitions`), ``world.link(a, b).spec`` / ``.clogged_until``,
``world.crash(name)`` / ``world.restart(name)``, ``node.clock_offset``, and
``node.tamper``: a Byzantine hook ``(world, node, dst, message, raw) -> [(dst, raw,
delay), ...]`` that rewrites every frame the node sends (:class:`sim.nemesis.Byzantine`
drops, delays, duplicates, replays, corrupts, or equivocates per destination).

Observing
---------
* ``Notify(kind, detail)`` actions are appended to ``world.notifications`` as
  :class:`NotifyRecord` ``(time, node, core, kind, detail)`` and passed to every
  listener added with ``world.on_notify(fn)``; ``world.on_send(fn)`` sees every
  ``Send`` as ``fn(node, peer, message)`` (what a node said, e.g. what it signed).
* ``world.add_checker(name, fn)``: ``fn(world) -> str | None`` runs after every
  event; the first non-None return stops the run and is kept in
  ``world.violation`` (:class:`Violation`, with the event that broke it).
  Checkers must be cheap: keep state incrementally from ``on_notify``.
* ``world.metrics`` (a dict of counters), ``world.trace_hash()`` (a digest of every
  event delivered: time, node, kind and payload), ``world.events`` (count).
* A core that raises stops the run; the exception names the node, core and event.

Scenarios
---------
A scenario (topology, workload, faults, checkers, quiet phase) is a function
registered with ``@sim.scenario.scenario(...)`` in a module under
``sim/scenarios/`` that ``sim/scenarios/__init__.py`` imports; see
:mod:`sim.scenario` for how one is written, and ``sim/scenarios/counter.py``
for a complete example. ``dwcp sim list / run / sweep`` run them.
'''

from __future__ import annotations

import hashlib
import heapq
import random
import struct
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from mesh import wire
from mesh.core import (
    CancelTimer,
    Notify,
    Offload,
    Offloaded,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from sim.network import DATACENTER_LINK, Link, LinkSpec
from sim.node import HostedCore, NotifyRecord, SimError, SimNode, Tamper, Violation
from sim.rng import child_rng

#: Events between two looks at the clock for ``World.wall_deadline`` (~0.1 s of a
#: typical run at 46,000 events/s, ``dwcp bench sim``).
WALL_CHECK_EVENTS = 4096


class WallClockExceeded(SimError):
    """A run went past ``World.wall_deadline``: a livelock or an event storm, or a
    machine too slow for the bound; ``dwcp sim run`` replays it without one."""

__all__ = ["World", "SimNode", "HostedCore", "NotifyRecord", "Violation", "SimError", "Tamper",
           "WallClockExceeded", "WALL_CHECK_EVENTS"]

#: Seconds before a broken control connection is reported down: the ping timeout
#: of the `websockets` library (ping_interval=20 s, ping_timeout=20 s defaults).
PEER_DOWN_AFTER = 20.0
#: Seconds before a possible connection is reported up: the initial reconnect
#: backoff of gRPC's connection-backoff spec (INITIAL_BACKOFF = 1 s).
PEER_UP_AFTER = 1.0

#: Each traced event is (time, payload length) packed, then "node\0kind\0", then payload.
_pack_head = struct.Struct("<dI").pack
#: The trace is buffered and hashed in blocks of this size (one update per event costs more).
TRACE_BLOCK = 1 << 16




class World:
    def __init__(
        self,
        seed: int,
        *,
        default_link: LinkSpec = DATACENTER_LINK,
        connection_events: bool = True,
        peer_up_after: float = PEER_UP_AFTER,
        peer_down_after: float = PEER_DOWN_AFTER,
        decode_frames: bool = True,
    ) -> None:
        self.seed = seed
        # A fresh decode memo per world: the n replicas hosted here decode every signed
        # body n times or more, the memo decodes it once (mesh.wire.enable_decode_memo:
        # same messages, so the same run and trace).
        wire.enable_decode_memo()
        #: False: an untampered frame hands the receiver the sender's (immutable) message
        #: object instead of decoding the bytes again. The bytes are still encoded, sized,
        #: carried and traced; only the redundant decode is skipped (a third of a long
        #: mesh run's time). Tampered frames are always decoded. The check that both
        #: settings give the same run: tests/test_mesh_scenarios.py.
        self.decode_frames = decode_frames
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.default_link = default_link
        self.links: dict[tuple[str, str], Link] = {}
        self.connection_events = connection_events
        self.peer_up_after = peer_up_after
        self.peer_down_after = peer_down_after
        self.metrics: dict[str, int] = {
            "sent": 0, "delivered": 0, "bytes_sent": 0, "decode_errors": 0,
            "dropped_partition": 0, "dropped_down": 0, "undeliverable": 0, "unknown_peer": 0,
            "timers_fired": 0, "crashes": 0, "restarts": 0,
        }
        self.notifications: list[NotifyRecord] = []
        self.violation: Violation | None = None
        #: ``time.monotonic()`` after which :meth:`run` gives up (a sweep's bound on one
        #: run's wall-clock time); None: no bound. Checked every ``WALL_CHECK_EVENTS``
        #: events, so it never changes what a run does before it fires.
        self.wall_deadline: float | None = None
        #: virtual seconds from an ``Offload`` to its ``Offloaded`` (a worker thread's time)
        self.offload_delay = 0.5
        self.events = 0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0
        self._timer_token = 0
        self._blocked: dict[tuple[str, str], int] = {}
        self._block_groups: dict[int, list[tuple[str, str]]] = {}
        self._block_token = 0
        self._conn: dict[tuple[str, str], bool] = {}
        self._conn_pending: set[tuple[str, str]] = set()
        self._listeners: list[Callable[[NotifyRecord], None]] = []
        self._send_listeners: list[Callable[[str, str, Any], None]] = []
        self._checkers: list[tuple[str, Callable[[World], str | None]]] = []
        self._trace = hashlib.blake2b(digest_size=16)
        self._trace_buf = bytearray()
        self._trace_keys: dict[tuple[str, str], bytes] = {}
        self._trace_sink: Callable[[str], None] | None = None
        self._current: tuple[str, str, Any] = ("", "", None)

    # ------------------------------------------------------------------ setup

    def rng(self, name: str) -> random.Random:
        """A random stream for component ``name``, independent of every other."""
        return child_rng(self.seed, name)

    def node_names(self) -> list[str]:
        return list(self.nodes)

    def add_node(self, name: str, build: Callable[[SimNode], None]) -> SimNode:
        if name in self.nodes:
            raise SimError(f"a node named {name!r} already exists")
        node = SimNode(self, name, build)
        self.nodes[name] = node
        build(node)
        node.up = True
        self._schedule(self.now, self._start, node)
        return node

    def set_link(self, src: str, dst: str, spec: LinkSpec, both: bool = True) -> None:
        self.link(src, dst).spec = spec
        if both:
            self.link(dst, src).spec = spec

    def set_links(self, specs: dict[tuple[str, str], LinkSpec]) -> None:
        for (src, dst), spec in specs.items():
            self.link(src, dst).spec = spec

    def link(self, src: str, dst: str) -> Link:
        key = (src, dst)
        link = self.links.get(key)
        if link is None:
            link = Link(src, dst, self.default_link, self.rng(f"link/{src}/{dst}"))
            self.links[key] = link
        return link

    def on_notify(self, listener: Callable[[NotifyRecord], None]) -> None:
        self._listeners.append(listener)

    def on_send(self, listener: Callable[[str, str, Any], None]) -> None:
        """Call ``listener(node, peer, message)`` for every ``Send`` a core returns, as the
        world executes it (before any Byzantine hook rewrites the frame)."""
        self._send_listeners.append(listener)

    def add_checker(self, name: str, check: Callable[[World], str | None]) -> None:
        self._checkers.append((name, check))

    def trace_to(self, sink: Callable[[str], None] | None) -> None:
        """Also write one line per delivered event to ``sink`` (for ``--trace FILE``)."""
        self._trace_sink = sink

    # ------------------------------------------------------------------ scheduling

    def _schedule(self, at: float, fn: Callable[[Any], None], arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, fn, arg))

    def at(self, at: float, fn: Callable[[World], None], label: str) -> None:
        """Run ``fn(world)`` at virtual time ``at`` (a fault, a workload step)."""
        self._schedule(max(at, self.now), self._callback, (fn, label))

    def after(self, delay: float, fn: Callable[[World], None], label: str) -> None:
        self.at(self.now + delay, fn, label)

    def _callback(self, arg: tuple[Callable[[World], None], str]) -> None:
        fn, label = arg
        self._record("-", "W", label.encode())
        self._current = ("-", label, None)
        fn(self)

    # ------------------------------------------------------------------ running

    def run(
        self,
        until: float | None = None,
        predicate: Callable[[World], bool] | None = None,
        max_events: int | None = None,
    ) -> bool:
        """Deliver events in (time, sequence) order until virtual time ``until``, until
        ``predicate(world)`` holds (checked after every event), until ``max_events``, or
        until a checker reports a violation. Returns True iff the predicate held (or, with
        no predicate, the run reached ``until`` or ran out of events without a violation)."""
        heap = self._heap
        pop = heapq.heappop
        checkers = self._checkers
        budget = -1 if max_events is None else max_events
        wall = self.wall_deadline
        if predicate is not None and predicate(self):
            return True
        while heap and budget != 0:
            if until is not None and heap[0][0] > until:
                break
            at, _seq, fn, arg = pop(heap)
            self.now = at
            fn(arg)
            budget -= 1
            if wall is not None and not budget % WALL_CHECK_EVENTS and time.monotonic() > wall:
                raise WallClockExceeded(
                    f"the run took longer than its wall-clock bound ({self.events:,} events, "
                    f"virtual time {self.now:.3f} s)")
            if checkers:
                for name, check in checkers:
                    message = check(self)
                    if message is not None:
                        self.violation = Violation(self.now, name, message, self.describe_event())
                        return False
            if predicate is not None and predicate(self):
                return True
        if until is not None and budget != 0 and self.now < until:
            self.now = until
        return predicate is None

    def describe_event(self) -> str:
        node, kind, detail = self._current
        return f"t={self.now:.6f} node={node} {kind} {detail!r}"[:500]

    def trace_hash(self) -> str:
        self._trace.update(self._trace_buf)
        self._trace_buf.clear()
        return self._trace.hexdigest()

    def _record(self, node: str, kind: str, payload: bytes) -> None:
        self.events += 1
        key = self._trace_keys.get((node, kind))
        if key is None:
            key = self._trace_keys[(node, kind)] = f"{node}\x00{kind}\x00".encode()
        buf = self._trace_buf
        buf += _pack_head(self.now, len(payload))
        buf += key
        buf += payload
        if len(buf) > TRACE_BLOCK:
            self._trace.update(buf)
            buf.clear()
        if self._trace_sink is not None:
            digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
            self._trace_sink(f"{self.now:.9f} {node} {kind} {digest}")

    # ------------------------------------------------------------------ cores

    def _deliver_event(self, node: SimNode, hosted: HostedCore, event: Any) -> None:
        self._current = (node.name, hosted.name, event)
        try:
            actions = hosted.core.handle(self.now + node.clock_offset, event)
        except Exception as exc:
            raise SimError(f"core {hosted.name!r} on node {node.name} raised "
                           f"{type(exc).__name__}: {exc} handling {event!r}"[:1000]) from exc
        if actions:
            self._execute(node, hosted, actions)

    def _execute(self, node: SimNode, hosted: HostedCore, actions: Iterable[Any]) -> None:
        incarnation = node.incarnation
        last_msg: Any = None
        last_raw = b""
        for action in actions:
            kind = type(action)
            if kind is Send:
                msg = action.message
                if msg is not last_msg:
                    try:
                        last_raw = wire.encode(msg)
                    except wire.WireError as exc:
                        raise SimError(f"core {hosted.name!r} on {node.name} sent a message "
                                       f"that does not encode: {exc}") from exc
                    last_msg = msg
                for send_listener in self._send_listeners:
                    send_listener(node.name, action.peer, msg)
                self._send(node, action.peer, msg, last_raw)
            elif kind is SetTimer:
                self._timer_token += 1
                token = self._timer_token
                hosted.timers[action.key] = token
                at = action.at - node.clock_offset
                self._schedule(at if at > self.now else self.now, self._fire_timer,
                               (hosted, action.key, token, node.incarnation))
            elif kind is CancelTimer:
                hosted.timers.pop(action.key, None)
            elif kind is Persist:
                node.store.put(action.key, action.value, action.sync)
                if node.incarnation != incarnation:
                    return  # crashed right after this write (SimStore.after_sync)
            elif kind is Notify:
                record = NotifyRecord(self.now, node.name, hosted.name, action.kind, action.detail)
                self.notifications.append(record)
                for listener in self._listeners:
                    listener(record)
            elif kind is Offload:
                try:
                    done = Offloaded(action.key, action.work())
                except Exception as exc:  # the work's failure is the core's to judge
                    done = Offloaded(action.key, None, exc)
                self._schedule(self.now + self.offload_delay, self._offloaded,
                               (hosted, done, node.incarnation))
            else:
                raise SimError(f"core {hosted.name!r} on {node.name} returned {action!r}, "
                               f"which is not an action of mesh.core")

    def _offloaded(self, arg: tuple[HostedCore, Offloaded, int]) -> None:
        hosted, done, incarnation = arg
        node = hosted.node
        if node.incarnation != incarnation or not node.up:
            return  # the node crashed while the work ran: its outcome is lost
        self._record(node.name, "O", repr(done.key).encode())
        self._deliver_event(node, hosted, done)

    def _fire_timer(self, arg: tuple[HostedCore, Hashable, int, int]) -> None:
        hosted, key, token, incarnation = arg
        node = hosted.node
        if node.incarnation != incarnation or not node.up or hosted.timers.get(key) != token:
            return
        del hosted.timers[key]
        self.metrics["timers_fired"] += 1
        self._record(node.name, "T", repr(key).encode())
        self._deliver_event(node, hosted, TimerFired(key))

    def invoke(self, name: str, core: str, fn: Callable[[Any, float], Iterable[Any] | None],
               label: str) -> bool:
        """Call ``fn(core, now)`` on a live node's core and execute the actions it returns."""
        node = self.nodes[name]
        if not node.up:
            return False
        hosted = node.cores[core]
        self._record(name, "I", f"{core}\x00{label}".encode())
        self._current = (name, core, label)
        try:
            actions = fn(hosted.core, self.now + node.clock_offset)
        except Exception as exc:
            raise SimError(f"core {core!r} on node {name} raised {type(exc).__name__}: {exc} "
                           f"in {label!r}"[:1000]) from exc
        if actions:
            self._execute(node, hosted, actions)
        return True

    def _start(self, node: SimNode) -> None:
        if not node.up:
            return
        self._record(node.name, "S", b"%d" % node.incarnation)
        incarnation = node.incarnation
        for hosted in list(node.cores.values()):
            if node.incarnation != incarnation:
                break  # crashed during an earlier core's start (SimStore.after_sync)
            start = getattr(hosted.core, "start", None)
            if start is not None:
                self._current = (node.name, hosted.name, "start")
                try:
                    actions = start(self.now + node.clock_offset)
                except Exception as exc:
                    raise SimError(f"core {hosted.name!r} on node {node.name} raised "
                                   f"{type(exc).__name__}: {exc} in start()"[:1000]) from exc
                if actions:
                    self._execute(node, hosted, actions)
        self.refresh_connections()

    # ------------------------------------------------------------------ network

    def _send(self, node: SimNode, dst: str, msg: Any, raw: bytes) -> None:
        if node.tamper is not None:
            for target, data, delay in node.tamper(self, node, dst, msg, raw):
                self.transmit(node.name, target, data, delay)
        else:
            self.transmit(node.name, dst, raw, 0.0, None if self.decode_frames else msg)

    def transmit(self, src: str, dst: str, raw: bytes, delay: float = 0.0,
                 message: Any = None) -> None:
        """Put ``raw`` on the link ``src -> dst`` at ``now + delay``. ``message``, if
        given, is what ``raw`` decodes to: the receiver gets it without decoding."""
        metrics = self.metrics
        metrics["sent"] += 1
        if dst not in self.nodes:
            metrics["unknown_peer"] += 1
            return
        if (src, dst) in self._blocked:
            metrics["dropped_partition"] += 1
            return
        link = self.links.get((src, dst)) or self.link(src, dst)
        metrics["bytes_sent"] += len(raw)
        for arrival in link.transmit(self.now + delay, len(raw)):
            self._schedule(arrival, self._arrive, (src, dst, raw, message))

    def _arrive(self, arg: tuple[str, str, bytes, Any]) -> None:
        src, dst, raw, msg = arg
        node = self.nodes[dst]
        metrics = self.metrics
        if not node.up:
            metrics["dropped_down"] += 1
            return
        if (src, dst) in self._blocked:
            metrics["dropped_partition"] += 1
            return
        if msg is None:
            try:
                msg = wire.decode(raw)
            except wire.WireError:
                metrics["decode_errors"] += 1
                self._record(dst, "X", raw)
                return
        hosted = node.route(type(msg))
        if hosted is None:
            metrics["undeliverable"] += 1
            return
        metrics["delivered"] += 1
        self._record(dst, "R", raw)
        self._deliver_event(node, hosted, Received(src, msg, raw))

    # ------------------------------------------------------------------ faults

    def block(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Block the directed pairs (a partition or cut); returns a token for :meth:`unblock`.
        Overlapping blocks nest: a pair flows again once every block on it is lifted."""
        group = sorted(set(pairs))
        for pair in group:
            self._blocked[pair] = self._blocked.get(pair, 0) + 1
        self._block_token += 1
        self._block_groups[self._block_token] = group
        self.refresh_connections()
        return self._block_token

    def unblock(self, token: int) -> None:
        for pair in self._block_groups.pop(token, []):
            count = self._blocked[pair] - 1
            if count:
                self._blocked[pair] = count
            else:
                del self._blocked[pair]
        self.refresh_connections()

    def unblock_all(self) -> None:
        for token in sorted(self._block_groups):
            self.unblock(token)

    def blocked(self, src: str, dst: str) -> bool:
        return (src, dst) in self._blocked

    def crash(self, name: str) -> list[str]:
        """Crash a node: cores and timers are gone, unsynced writes are lost (returned)."""
        node = self.nodes[name]
        if not node.up:
            return []
        self._record(name, "C", b"")
        self.metrics["crashes"] += 1
        node.up = False
        node.incarnation += 1
        node._unmount_all()
        lost = node.store.crash()
        for peer in self.nodes:
            self._conn.pop((name, peer), None)
            self._conn_pending.discard((name, peer))
        self.refresh_connections()
        return lost

    def restart(self, name: str) -> None:
        """Restart a crashed node: its build function runs again over its surviving store."""
        node = self.nodes[name]
        if node.up:
            return
        self._record(name, "U", b"")
        self.metrics["restarts"] += 1
        node.build(node)
        node.up = True
        self._start(node)

    def connected(self, a: str, b: str) -> bool:
        blocked = self._blocked
        return (self.nodes[a].up and self.nodes[b].up
                and (a, b) not in blocked and (b, a) not in blocked)

    def refresh_connections(self) -> None:
        """Schedule PeerUp/PeerDown where a control connection's possibility changed."""
        if not self.connection_events:
            return
        for a, node in self.nodes.items():
            if not node.up:
                continue
            for b in self.nodes:
                if a == b or (a, b) in self._conn_pending:
                    continue
                want = self.connected(a, b)
                if want != self._conn.get((a, b), False):
                    self._conn_pending.add((a, b))
                    delay = self.peer_up_after if want else self.peer_down_after
                    self._schedule(self.now + delay, self._conn_check, (a, b, node.incarnation))

    def _conn_check(self, arg: tuple[str, str, int]) -> None:
        a, b, incarnation = arg
        self._conn_pending.discard((a, b))
        node = self.nodes[a]
        if not node.up or node.incarnation != incarnation:
            self.refresh_connections()
            return
        want = self.connected(a, b)
        if want == self._conn.get((a, b), False):
            return
        self._conn[(a, b)] = want
        self._record(a, "P" if want else "D", b.encode())
        event = PeerUp(b) if want else PeerDown(b)
        for hosted in list(node.cores.values()):
            if node.incarnation != incarnation:
                break
            self._deliver_event(node, hosted, event)
