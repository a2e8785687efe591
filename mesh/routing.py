"""Route election: per destination, a control route and a bulk route, each direct or
through one intermediate DC (RON, Andersen et al., SOSP 2001: one indirect hop
recovers almost every path a multi-hop overlay would).

* control route: least latency (sum of the hops' RTTs);
* bulk route: widest bottleneck bandwidth, then least latency (an unmeasured
  bandwidth ranks below every measured one).

A hop must be a usable link (reported by both ends, not down, loss at most
``loss_limit``); an intermediate must be alive (not suspect, dead or left); a dead or
departed destination has no route. A suspect destination keeps its routes: it may be
alive, and SWIM keeps talking to a suspect too.

Stability: a route whose hop became unusable is replaced at once (that is the reroute);
otherwise a route changes only when a candidate beats it by ``margin`` on
``hysteresis`` consecutive periodic elections, and a destination without a route gets
one only after the same candidate won ``hysteresis`` elections in a row (so after a
partition heals the first route chosen is the settled one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from mesh.core import Notify
from mesh.linkstate import LinkView
from mesh.membership import State

__all__ = ["RouteConfig", "Route", "RouteElection", "CONTROL", "BULK"]

CONTROL = "control"
BULK = "bulk"


@attrs.frozen
class RouteConfig:
    #: Above 10 % loss TCP throughput is dominated by timeouts (Padhye, Firoiu, Towsley,
    #: Kurose, "Modeling TCP Throughput", SIGCOMM 1998): such a hop is avoided.
    loss_limit: float = 0.10
    #: A challenger must be 10 % better (latency, or bottleneck bandwidth) and, for
    #: latency, by 5 ms: above the EWMA noise of the geo matrix (a few percent), so two
    #: near-equal paths never flap.
    margin: float = 0.10
    margin_ms: float = 5.0
    #: K: the issue's "better for K estimates"; 3, as for link modes.
    hysteresis: int = 3


@attrs.frozen
class Route:
    hops: tuple[str, ...]  # (source, [intermediate,] destination)

    @property
    def next_hop(self) -> str:
        return self.hops[1]

    @property
    def via(self) -> str | None:
        return self.hops[1] if len(self.hops) == 3 else None


@attrs.frozen
class _Candidate:
    route: Route
    latency_ms: float
    bottleneck_mbps: float  # 0.0: unmeasured


LinkLookup = Callable[[str, str], LinkView | None]
StateLookup = Callable[[str], State]


class RouteElection:
    def __init__(self, me: str, peers: Sequence[str], config: RouteConfig = RouteConfig()) -> None:
        self.me = me
        self.peers = sorted(peers)
        self.cfg = config
        self.routes: dict[tuple[str, str], Route | None] = {}
        self._streak: dict[tuple[str, str], tuple[Route, int]] = {}
        self.changes = 0

    def route(self, kind: str, dst: str) -> Route | None:
        return self.routes.get((kind, dst))

    def _usable(self, view: LinkView | None) -> bool:
        return view is not None and not view.down and view.loss <= self.cfg.loss_limit

    def candidates(self, dst: str, state: StateLookup, link: LinkLookup) -> list[_Candidate]:
        if state(dst) >= State.DEAD:
            return []
        out = []
        direct = link(self.me, dst)
        if self._usable(direct):
            assert direct is not None
            out.append(_Candidate(Route((self.me, dst)), direct.rtt_ms, direct.bw_mbps or 0.0))
        for via in self.peers:
            if via == dst or state(via) != State.ALIVE:
                continue
            a, b = link(self.me, via), link(via, dst)
            if not (self._usable(a) and self._usable(b)):
                continue
            assert a is not None and b is not None
            bw = min(a.bw_mbps or 0.0, b.bw_mbps or 0.0)
            out.append(_Candidate(Route((self.me, via, dst)), a.rtt_ms + b.rtt_ms, bw))
        return out

    @staticmethod
    def _rank(kind: str, c: _Candidate) -> tuple[float, float, tuple[str, ...]]:
        if kind == CONTROL:
            return (c.latency_ms, 0.0, c.route.hops)
        return (-c.bottleneck_mbps, c.latency_ms, c.route.hops)

    def _better(self, kind: str, new: _Candidate, cur: _Candidate) -> bool:
        m = self.cfg.margin
        latency = cur.latency_ms - new.latency_ms >= max(m * cur.latency_ms, self.cfg.margin_ms)
        if kind == CONTROL:
            return latency
        if new.bottleneck_mbps > cur.bottleneck_mbps * (1 + m):
            return True
        same_width = new.bottleneck_mbps >= cur.bottleneck_mbps * (1 - m)
        return same_width and latency

    def on_best(self, kind: str, dst: str, state: StateLookup, link: LinkLookup) -> bool:
        """Whether the held route is the best candidate or within the margin of it."""
        cands = self.candidates(dst, state, link)
        cur = self.routes.get((kind, dst))
        best = min(cands, key=lambda c: self._rank(kind, c), default=None)
        if best is None:
            return cur is None
        cur_c = next((c for c in cands if c.route == cur), None)
        return cur_c is not None and (best.route == cur or not self._better(kind, best, cur_c))

    def elect(self, now: float, state: StateLookup, link: LinkLookup, tick: bool) -> list[Notify]:
        """Re-elect every route. ``tick`` marks a periodic election, the only kind that
        counts towards hysteresis; other calls only replace routes that broke."""
        out: list[Notify] = []
        views: dict[tuple[str, str], LinkView | None] = {}
        states: dict[str, State] = {}

        def memo_link(a: str, b: str) -> LinkView | None:
            if (a, b) not in views:
                views[(a, b)] = link(a, b)
            return views[(a, b)]

        def memo_state(name: str) -> State:
            if name not in states:
                states[name] = state(name)
            return states[name]

        for dst in self.peers:
            cands = self.candidates(dst, memo_state, memo_link)
            for kind in (CONTROL, BULK):
                out += self._elect_one(kind, dst, cands, tick)
        return out

    def _elect_one(self, kind: str, dst: str, cands: list[_Candidate], tick: bool) -> list[Notify]:
        key = (kind, dst)
        cur = self.routes.get(key)
        best = min(cands, key=lambda c: self._rank(kind, c), default=None)
        cur_c = next((c for c in cands if cur is not None and c.route == cur), None)
        if best is None:
            self._streak.pop(key, None)
            return self._set(key, None) if cur is not None else []
        if cur is not None and cur_c is None:
            self._streak.pop(key, None)
            return self._set(key, best.route)  # the current route broke: reroute now
        if cur_c is not None and (best.route == cur or not self._better(kind, best, cur_c)):
            self._streak.pop(key, None)
            return []
        if not tick:
            return []
        held, count = self._streak.get(key, (best.route, 0))
        count = count + 1 if held == best.route else 1
        if count < self.cfg.hysteresis:
            self._streak[key] = (best.route, count)
            return []
        self._streak.pop(key, None)
        return self._set(key, best.route)

    def _set(self, key: tuple[str, str], route: Route | None) -> list[Notify]:
        old = self.routes.get(key)
        self.routes[key] = route
        self.changes += 1
        return [Notify("route", {
            "kind": key[0], "dst": key[1],
            "hops": list(route.hops) if route is not None else None,
            "was": list(old.hops) if old is not None else None,
        })]
