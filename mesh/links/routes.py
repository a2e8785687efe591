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

from collections.abc import Callable, Iterable, Sequence

import attrs

from mesh.core import Notify
from mesh.gossip.membership import State
from mesh.links.estimates import LinkView

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


@attrs.define
class _Candidates:
    """One destination's candidates (by intermediate, None: direct) and the best of each
    kind, kept up to date one candidate at a time as the links under them change."""

    by_via: dict[str | None, _Candidate]
    best: dict[str, _Candidate | None]
    by_route: dict[Route, _Candidate]


LinkLookup = Callable[[str, str], LinkView | None]
StateLookup = Callable[[str], State]


class RouteElection:
    def __init__(self, me: str, peers: Sequence[str], config: RouteConfig = RouteConfig()) -> None:
        self.me = me
        self.peers = sorted(peers)
        self.cfg = config
        self.routes: dict[tuple[str, str], Route | None] = {}
        self._streak: dict[tuple[str, str], tuple[Route, int]] = {}
        self._cache: dict[str, _Candidates] = {}
        self._states: tuple[State, ...] = ()
        self._views: dict[tuple[str, str], LinkView | None] = {}
        self.changes = 0

    def route(self, kind: str, dst: str) -> Route | None:
        return self.routes.get((kind, dst))

    def _usable(self, view: LinkView | None) -> bool:
        return view is not None and not view.down and view.loss <= self.cfg.loss_limit

    def _candidate(self, dst: str, via: str | None, state: StateLookup,
                   link: LinkLookup) -> _Candidate | None:
        """The route to ``dst`` direct (``via`` None) or through ``via``, if usable."""
        if via is None:
            direct = link(self.me, dst)
            if not self._usable(direct):
                return None
            assert direct is not None
            return _Candidate(Route((self.me, dst)), direct.rtt_ms, direct.bw_mbps or 0.0)
        if via == dst or state(via) != State.ALIVE:
            return None
        a, b = link(self.me, via), link(via, dst)
        if not (self._usable(a) and self._usable(b)):
            return None
        assert a is not None and b is not None
        bw = min(a.bw_mbps or 0.0, b.bw_mbps or 0.0)
        return _Candidate(Route((self.me, via, dst)), a.rtt_ms + b.rtt_ms, bw)

    def candidates(self, dst: str, state: StateLookup, link: LinkLookup) -> list[_Candidate]:
        if state(dst) >= State.DEAD:
            return []
        out = []
        for via in (None, *self.peers):
            c = self._candidate(dst, via, state, link)
            if c is not None:
                out.append(c)
        return out

    def _build(self, dst: str, state: StateLookup, link: LinkLookup) -> _Candidates:
        cands = self.candidates(dst, state, link)
        return _Candidates(
            by_via={c.route.via: c for c in cands},
            best={kind: self._best(kind, cands) for kind in (CONTROL, BULK)},
            by_route={c.route: c for c in cands})

    def _best(self, kind: str, cands: Iterable[_Candidate]) -> _Candidate | None:
        best: _Candidate | None = None
        for c in cands:
            if best is None or self._rank(kind, c) < self._rank(kind, best):
                best = c
        return best

    def _shape(self, view: LinkView | None) -> tuple[float, float, bool] | None:
        """What a candidate takes from a link's view."""
        if view is None:
            return None
        return (view.rtt_ms, view.bw_mbps or 0.0, self._usable(view))

    def _update(self, dst: str, via: str | None, state: StateLookup, link: LinkLookup) -> None:
        """Recompute one candidate of ``dst`` (a link under it changed) and the bests."""
        cached = self._cache.get(dst)
        if cached is None:
            return  # built from scratch at the next election
        if state(dst) >= State.DEAD:
            return  # no candidates while dead; a state change rebuilds everything
        old = cached.by_via.pop(via, None)
        new = self._candidate(dst, via, state, link)
        if old is not None:
            del cached.by_route[old.route]
        if new is not None:
            cached.by_via[via] = new
            cached.by_route[new.route] = new
        for kind in (CONTROL, BULK):
            best = cached.best[kind]
            if old is not None and best is old:
                # The best changed: the minimum over all again (ranks are a total order,
                # so the result is the one a full election would find).
                cached.best[kind] = self._best(kind, cached.by_via.values())
            elif new is not None and (best is None
                                      or self._rank(kind, new) < self._rank(kind, best)):
                cached.best[kind] = new

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

    def elect(self, now: float, state: StateLookup, link: LinkLookup, tick: bool,
              changed: Iterable[tuple[str, str]] | None = None) -> list[Notify]:
        """Re-elect every route. ``tick`` marks a periodic election, the only kind that
        counts towards hysteresis; other calls only replace routes that broke.

        ``changed``: the directed links whose views may have changed since the last call
        (None: any may have). The views of the others are reused and only the candidates
        over changed links are recomputed, unless a member changed state; the routes are
        those of a full recomputation. Outside a tick, destinations whose candidates did
        not change are skipped (their last election left nothing to do)."""
        states = tuple(state(p) for p in self.peers)
        by_name = dict(zip(self.peers, states, strict=True))
        get_state = by_name.__getitem__
        views = self._views

        def memo_link(a: str, b: str) -> LinkView | None:
            if (a, b) not in views:
                views[(a, b)] = link(a, b)
            return views[(a, b)]

        touched: set[str] = set()
        if changed is None or states != self._states:
            self._cache.clear()
            views.clear()
            self._states = states
        else:
            for a, b in sorted(set(changed)):
                seen = (a, b) in views
                old = views.pop((a, b), None)
                if seen and self._shape(old) == self._shape(memo_link(a, b)):
                    continue  # what changed (jitter, a loss below the limit) moves no route
                if a == self.me and b in by_name:
                    # our own link to b: the direct route to b, and every route via b
                    for dst in self.peers:
                        self._update(dst, None if dst == b else b, get_state, memo_link)
                    touched.update(self.peers)
                elif a in by_name and b in by_name:
                    self._update(b, a, get_state, memo_link)  # a -> b is a second hop
                    touched.add(b)
        out: list[Notify] = []
        for dst in self.peers:
            cached = self._cache.get(dst)
            if cached is None:
                cached = self._cache[dst] = self._build(dst, get_state, memo_link)
            elif not tick and dst not in touched:
                # Same candidates as at its last election, which left its routes held
                # and usable (or absent): outside a tick there is nothing to do.
                continue
            for kind in (CONTROL, BULK):
                out += self._elect_one(kind, dst, cached, tick)
        return out

    def _elect_one(self, kind: str, dst: str, cached: _Candidates, tick: bool) -> list[Notify]:
        key = (kind, dst)
        cur = self.routes.get(key)
        best = cached.best[kind]
        cur_c = cached.by_route.get(cur) if cur is not None else None
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
