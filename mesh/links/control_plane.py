"""The mesh control plane of one DC as a single sans-I/O core.

:class:`MeshControl` joins the pieces: SWIM membership (mesh.gossip.membership) whose
gossip also carries the link-state table (mesh.links.estimates), the link modes
(mesh.links.modes) and route election (mesh.links.routes), plus forwarding of routed control
messages. A host mounts it for the tag prefixes in :data:`ACCEPTS` (:func:`attach` does that on a
``mesh.runtime.node_runtime.Runtime``) and calls ``start(now)`` once, or lets the first
event start it;
it emits ``Notify`` for every member, link-mode and route change (the runtime logs each).

Membership updates and link entries are statements signed by the DC they speak for
(:mod:`mesh.gossip.statements`): ``statements`` holds this DC's identity and the
federation's keys; its ``refused`` counts every statement refused, by reason.

Routed control messages (:class:`~mesh.gossip.control_msgs.Routed`) carry src, dst and a TTL
of at most 2: the source sends to the next hop of its control route; an intermediate
forwards straight to the destination; the destination hands the inner message to the
``deliver`` callback (or emits ``Notify("control-message")``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from mesh import wire
from mesh.core import Action, Event, Notify, PeerUp, Received, Send, SetTimer, Store, TimerFired
from mesh.gossip.control_msgs import (
    ROUTED_TTL,
    Ack,
    BandwidthProbe,
    BandwidthReport,
    Gossip,
    LinkEntry,
    LinkPing,
    Nack,
    OriginDigest,
    Ping,
    PingReq,
    Routed,
    Signed,
    Sync,
)
from mesh.gossip.membership import Membership, SwimConfig
from mesh.gossip.statements import CACHE_MAX, Statements
from mesh.links.control_status import MeshStatus, PeerStatus
from mesh.links.estimates import LinkConfig, LinkProber, LinkTable
from mesh.links.modes import ModeClassifier, ModeLimits
from mesh.links.routes import BULK, CONTROL, Route, RouteConfig, RouteElection

__all__ = ["MeshControl", "ACCEPTS", "attach", "statement_cache_size"]

#: Wire-tag prefixes of the messages this core handles.
ACCEPTS = ("swim.", "link.", "route.")

_SWIM = (Ping, PingReq, Ack, Nack, Gossip, Sync)
_SWIM_DEFAULTS, _LINK_DEFAULTS = SwimConfig(), LinkConfig()
_MODE_DEFAULTS, _ROUTE_DEFAULTS = ModeLimits(), RouteConfig()
Deliver = Callable[[float, str, Any], list[Action]]


class MeshControl:
    def __init__(
        self,
        me: str,
        peers: Sequence[str],
        rng: random.Random,
        *,
        statements: Statements,
        store: Store | None = None,
        swim: SwimConfig = _SWIM_DEFAULTS,
        link: LinkConfig = _LINK_DEFAULTS,
        modes: ModeLimits = _MODE_DEFAULTS,
        routes: RouteConfig = _ROUTE_DEFAULTS,
        deliver: Deliver | None = None,
    ) -> None:
        self.me = me
        self.peers = sorted(peers)
        self.statements = statements
        self.table = LinkTable(me, self.peers, statements)
        self.prober = LinkProber(me, self.peers, random.Random(rng.getrandbits(64)), self.table,
                                 link, store)
        self.membership = Membership(me, self.peers, random.Random(rng.getrandbits(64)), swim,
                                     links=self, probe_timeout=self.prober.rto,
                                     peer_rtt=self._peer_rtt, statements=statements)
        self.modes = ModeClassifier(modes)
        self.election = RouteElection(me, self.peers, routes)
        self.deliver = deliver
        self.route_interval = link.ping_interval
        self.counters: dict[str, int] = {"forwarded": 0, "delivered": 0, "routed_dropped": 0}
        self._dirty = False
        self._pending_modes: list[LinkEntry] = []
        self._started = False
        #: directed links whose views changed since the last election (None: any)
        self._changed: set[tuple[str, str]] | None = None

    # ------------------------------------------------------------------ LinkSync for SWIM

    def digest(self) -> tuple[OriginDigest, ...]:
        return self.table.digest()

    def entries_newer_than(self, digest: Sequence[OriginDigest]) -> list[Signed]:
        return self.table.entries_newer_than(digest)

    def lacks(self, digest: Sequence[OriginDigest]) -> bool:
        return self.table.lacks(digest)

    def merge(
        self, now: float, peer: str, statements: Sequence[Signed]
    ) -> list[tuple[LinkEntry, Signed]]:
        opened = self.table.open(now, peer, statements)
        self.prober.adopt_own([e for e, _ in opened])
        before = {(e.origin, e.peer): self._usable(self.table.entries.get((e.origin, e.peer)))
                  for e, _ in opened}
        adopted = self.table.merge(now, opened)
        for e, _ in adopted:
            self._touch(e)
            if before[(e.origin, e.peer)] != self._usable(e):
                self._dirty = True  # a hop appeared or broke: re-elect now, not at the tick
        self._pending_modes.extend(e for e, _ in adopted)
        return adopted

    def _touch(self, e: LinkEntry) -> None:
        """Entry origin -> peer feeds the views of that link in both directions."""
        if self._changed is not None:
            self._changed.update(((e.origin, e.peer), (e.peer, e.origin)))

    def _peer_rtt(self, a: str, b: str) -> float | None:
        view = self.table.view(a, b)
        return view.rtt_ms / 1000 if view is not None else None

    def _usable(self, e: LinkEntry | None) -> bool:
        return e is not None and not e.down and e.loss <= self.election.cfg.loss_limit

    # ------------------------------------------------------------------ core API

    def route(self, kind: str, dst: str) -> Route | None:
        return self.election.route(kind, dst)

    def start(self, now: float) -> list[Action]:
        self._started = True
        out = self.membership.start(now) + self.prober.start(now)
        out.append(SetTimer(("route", "tick"), now + self.route_interval))
        return out

    def leave(self, now: float) -> list[Action]:
        return self.membership.leave(now)

    def handle(self, now: float, event: Event) -> list[Action]:
        # A host without a start hook (mesh.runtime.node_runtime) starts us with the first event.
        out: list[Action] = [] if self._started else self.start(now)
        tick = False
        if isinstance(event, TimerFired) and isinstance(event.key, tuple) and event.key:
            kind = event.key[0]
            if kind == "swim":
                out += self.membership.handle(now, event)
            elif kind == "link" and event.key[1] == "ping":
                out += self.prober.ping_due(now, event.key[2])
            elif kind == "link" and event.key[1] == "check":
                out += self.prober.check(now)
                for peer in self.prober.silent:
                    self.membership.probe_soon(peer)
                self.prober.silent = []
            elif kind == "route":
                out.append(SetTimer(("route", "tick"), now + self.route_interval))
                tick = True
        elif isinstance(event, Received):
            out += self._received(now, event.peer, event.message)
        elif isinstance(event, PeerUp) and event.peer in self.peers:
            # An authenticated connection is direct evidence: a dead member gets a sync.
            out += self.membership.note_heard(now, event.peer)
        return self._settle(now, out, tick)

    def send_control(self, now: float, dst: str, message: Any) -> list[Action]:
        """Send ``message`` to DC ``dst`` along its control route (direct if none)."""
        if dst not in self.peers:
            raise ValueError(f"send_control: {dst!r} is not a peer of {self.me}")
        route = self.election.route(CONTROL, dst)
        hop = route.next_hop if route is not None else dst
        return [Send(hop, Routed(self.me, dst, ROUTED_TTL, wire.encode(message)))]

    def record_transfer(self, now: float, peer: str, nbytes: int, seconds: float) -> list[Action]:
        """The data plane's bandwidth sample of a bulk transfer to ``peer``."""
        return self._settle(now, self.prober.record_transfer(now, peer, nbytes, seconds), False)

    def probe_bandwidth(self, now: float, peer: str) -> list[Action]:
        return self.prober.probe_bandwidth(now, peer)

    # ------------------------------------------------------------------ internals

    def _received(self, now: float, peer: str, msg: Any) -> list[Action]:
        if isinstance(msg, _SWIM):
            return self.membership.handle(now, Received(peer, msg))
        if isinstance(msg, LinkPing):
            return self.prober.received_ping(now, peer, msg) + self.membership.note_heard(now, peer)
        if isinstance(msg, BandwidthProbe):
            return self.prober.received_train(now, peer, msg)
        if isinstance(msg, BandwidthReport):
            return self.prober.received_report(now, peer, msg)
        if isinstance(msg, Routed):
            return self._routed(now, peer, msg)
        why = f"unexpected {type(msg).__name__}"
        return [Notify("control-refused", {"peer": peer, "why": why})]

    def _routed(self, now: float, peer: str, msg: Routed) -> list[Action]:
        if msg.src not in self.peers or (msg.dst != self.me and msg.dst not in self.peers):
            self.counters["routed_dropped"] += 1
            return [Notify("control-refused", {"peer": peer, "why": "routed message names an "
                                               f"unknown DC ({msg.src} -> {msg.dst})"})]
        if msg.dst != self.me:
            if msg.ttl <= 1:
                self.counters["routed_dropped"] += 1
                return [Notify("control-refused", {"peer": peer, "why": "routed TTL exhausted"})]
            self.counters["forwarded"] += 1
            return [Send(msg.dst, Routed(msg.src, msg.dst, msg.ttl - 1, msg.payload))]
        try:
            inner = wire.decode(msg.payload)
        except wire.WireError as exc:
            self.counters["routed_dropped"] += 1
            return [Notify("control-refused", {"peer": peer, "why": f"routed payload: {exc}"})]
        self.counters["delivered"] += 1
        if self.deliver is not None:
            return self.deliver(now, msg.src, inner)
        return [Notify("control-message", {"src": msg.src, "message": inner})]

    def _settle(self, now: float, out: list[Action], tick: bool) -> list[Action]:
        """Spread our new link entries, feed the mode classifier, re-elect routes."""
        if self.prober.published:
            for entry, signed in self.prober.published:
                self._touch(entry)
                self.membership.broadcast_link(entry, signed)
                if entry.down or entry.loss > self.election.cfg.loss_limit:
                    self._dirty = True
                self._pending_modes.append(entry)
            self.prober.published = []
        if self._pending_modes:
            seen: set[tuple[str, str]] = set()
            for e in self._pending_modes:
                for src, dst in ((e.origin, e.peer), (e.peer, e.origin)):
                    if (src, dst) in seen:
                        continue
                    seen.add((src, dst))
                    view = self.table.view(src, dst)
                    if view is not None:
                        out.extend(self.modes.observe(
                            src, dst, view.rtt_ms, view.bw_mbps, view.loss))
            self._pending_modes = []
        if not self._dirty and any(isinstance(a, Notify) and a.kind == "member" for a in out):
            self._dirty = True
        if tick or self._dirty:
            self._dirty = False
            out.extend(self.election.elect(now, self.membership.state_of, self.table.view, tick,
                                           changed=self._changed))
            self._changed = set()
        return out

    def status(self) -> MeshStatus:
        """What this DC knows of every peer and its links (read-only, see control_status)."""
        peers = []
        for p in self.peers:
            view = self.table.view(self.me, p)
            own = self.table.entries.get((self.me, p))  # ours, before the peer reported
            routes = tuple((kind, None if (r := self.route(kind, p)) is None else r.hops)
                           for kind in (CONTROL, BULK))
            peers.append(PeerStatus(
                peer=p, member=self.membership.state_of(p),
                rtt_ms=view.rtt_ms if view else (own.rtt_ms or None) if own else None,
                loss=None if view is None else view.loss,
                bandwidth_mbps=view.bw_mbps if view else own.bw_mbps if own else None,
                down=None if view is None else view.down,
                mode=self.modes.mode(self.me, p), routes=routes))
        return MeshStatus(self.me, tuple(peers),
                          tuple(sorted(self.statements.refused.items())))


def statement_cache_size(dcs: int) -> int:
    """How many verified statements a node of a federation of ``dcs`` DCs remembers:
    4 x dcs^2 (every DC's member statement and link entries, dcs^2 in all, and the
    versions that replace them while they spread), at least 1,024 and at most
    :data:`~mesh.gossip.statements.CACHE_MAX` (sized for 64 DCs). Each DC republishes
    its link entries every few seconds under a new version, and the cache forgets only
    when full: with CACHE_MAX, a node of a 4-DC federation grew by ~230 statements
    (~90 KiB) a minute for 70 minutes (``dwcp bench soak --heap-report``), past what
    the federation has in flight by two orders of magnitude."""
    return min(CACHE_MAX, max(1024, 4 * dcs * dcs))


def attach(runtime: Any, me: str, peers: Sequence[str], rng: random.Random, *,
           store: Store | None = None, modes: Any = None) -> MeshControl:
    """Host the control plane on a ``mesh.runtime.node_runtime.Runtime`` (anything with
    ``add_core(name, core, tags)``, ``identity`` and ``keys``): membership, link
    estimates, modes and routes run over its real links, its statements are signed with
    the runtime's identity and checked against the federation's keys, and every member,
    mode and route change becomes a log line. ``modes`` is the federation's ``[modes]``
    table (``federation.config.ModeThresholds`` or anything with its attribute names)."""
    limits = ModeLimits.from_thresholds(modes) if modes is not None else ModeLimits()
    statements = Statements(me, runtime.identity, runtime.keys,
                            cache_max=statement_cache_size(len(peers) + 1))
    core = MeshControl(me, peers, rng, statements=statements, store=store, modes=limits)
    runtime.add_core("mesh", core, ACCEPTS)
    return core
