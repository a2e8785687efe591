"""The mesh control plane in the simulator: nodes running
:class:`mesh.links.control_plane.MeshControl` on the geo matrix, and the figures issue 4
asks of them.

:class:`MeshWorld` mounts the core on every node, keeps what the scenarios measure
incrementally from Notify records and from the link tables' adoption hook (so a long
run does not keep its notifications), and turns it into metrics:

* member events (who declared whom dead, when) -> detection times, false positives;
* route changes per (node, kind, destination) -> reroute and reconvergence times;
* ``update_convergence_p999_s``: for every link entry published while measuring, the
  time until each live node holds that version or a newer one; the 99.9th percentile
  over all (entry, node) pairs;
* ``control_bps_per_node``: bits sent by all nodes after the warm-up, per node and
  second (every byte these nodes send is control traffic).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

from mesh.gossip.control_msgs import LinkEntry
from mesh.gossip.statements import Statements
from mesh.links.control_plane import ACCEPTS, MeshControl
from sim.geo import geo_links
from sim.hosts.pbft_cluster import identity_for
from sim.scenario import Run
from sim.world import NotifyRecord, SimNode, World

__all__ = ["MeshWorld", "percentile", "WARMUP"]

#: The first anti-entropy rounds, initial RTT samples and route elections settle within
#: this (measured: routes are all set by ~10 s at N = 16, link modes by ~20 s).
WARMUP = 30.0
#: Histogram bin of propagation delays (10 ms) and its range.
_BIN = 0.01
_BINS = 12_000


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class MeshWorld:
    def __init__(self, run: Run, loss: float) -> None:
        params: dict[str, Any] = getattr(run, "params", {})
        configs = {k: params[k] for k in ("swim", "link", "routes") if k in params}
        self.run = run
        self.world: World = run.world
        # Decoding every frame again costs a third of a long run and decides nothing here:
        # the codec's round trip is tested on its own (tests/test_wire*), and
        # tests/test_mesh_scenarios.py checks that both settings give the same trace.
        self.world.decode_frames = bool(params.get("decode_frames", False))
        self.names = run.names()
        names = self.names
        self.member_events: list[tuple[float, str, str, str]] = []  # time, node, member, state
        self.route_log: dict[tuple[str, str, str], list[tuple[float, tuple[str, ...] | None]]] = {}
        self.measuring = False
        self._published: dict[tuple[str, str], list[tuple[int, float]]] = {}
        self._held: dict[tuple[str, str, str], int] = {}
        self._hist = [0] * (_BINS + 1)
        self._bytes_at_warmup = 0
        self.false_positives = 0

        self._started: dict[str, float] = {}
        self.identities = {n: identity_for(n) for n in names}
        keys = {n: i.public for n, i in self.identities.items()}

        def build(node: SimNode) -> None:
            self._started[node.name] = self.world.now
            statements = Statements(node.name, self.identities[node.name], keys)
            core = MeshControl(node.name, [n for n in names if n != node.name],
                               node.rng("mesh"), statements=statements, store=node.store,
                               modes=run.mode_limits(), **configs)
            core.table.on_adopt = lambda e, now, n=node.name: self._adopted(n, e, now)
            node.mount("mesh", core, accepts=ACCEPTS)

        for name in names:
            self.world.add_node(name, build)
        self.world.set_links(geo_links(names, run.regions(), loss=loss))
        self.world.on_notify(self._notified)
        self.world.at(WARMUP, self._warm, "mesh warm-up over")
        run.metric("update_convergence_p999_s", lambda w: self.convergence(99.9))
        run.metric("update_convergence_p50_s", lambda w: self.convergence(50))
        run.metric("updates_measured", lambda w: sum(self._hist))
        run.metric("control_bps_per_node", lambda w: self.control_bps())
        run.metric("false_positives", lambda w: self.false_positives)
        run.metric("routes_on_best_fraction", lambda w: self.on_best_fraction())
        run.liveness("every live node sees every live node alive", self.all_alive)

    # ------------------------------------------------------------------ observing

    def core(self, name: str) -> MeshControl:
        core: MeshControl = self.world.nodes[name].core("mesh")
        return core

    def _warm(self, world: World) -> None:
        self._bytes_at_warmup = world.metrics["bytes_sent"]
        self.measuring = True

    def _notified(self, r: NotifyRecord) -> None:
        if r.kind == "member":
            self.member_events.append((r.time, r.node, r.detail["name"], r.detail["state"]))
            if r.detail["state"] == "dead" and self.is_false_positive(r):
                self.false_positives += 1
        elif r.kind == "route":
            hops = tuple(r.detail["hops"]) if r.detail["hops"] is not None else None
            self.route_log.setdefault((r.node, r.detail["kind"], r.detail["dst"]), []).append(
                (r.time, hops))

    def is_false_positive(self, r: NotifyRecord) -> bool:
        """A live DC declared dead while it could talk to the declaring DC (scenarios with
        partitions override what "could talk" means)."""
        target = self.world.nodes[r.detail["name"]]
        return target.up and not self.world.blocked(r.node, target.name)

    def _adopted(self, node: str, e: LinkEntry, now: float) -> None:
        key = (e.origin, e.peer)
        if node == e.origin:
            if self.measuring:
                self._published.setdefault(key, []).append((e.version, self.world.now))
            return
        pubs = self._published.get(key)
        if not pubs:
            return
        held = self._held.get((node, *key), 0)
        lo = bisect.bisect_right(pubs, (held, math.inf))
        hi = bisect.bisect_right(pubs, (e.version, math.inf))
        for _, t in pubs[lo:hi]:
            if t < self._started[node]:
                continue  # published while this node was down: a rejoin, not propagation
            self._hist[min(_BINS, int((self.world.now - t) / _BIN))] += 1
        self._held[(node, *key)] = max(held, e.version)

    # ------------------------------------------------------------------ figures

    def convergence(self, q: float) -> float | None:
        total = sum(self._hist)
        if not total:
            return None
        need = math.ceil(q / 100 * total)
        seen = 0
        for i, count in enumerate(self._hist):
            seen += count
            if seen >= need:
                return round((i + 1) * _BIN, 3)
        return None

    def control_bps(self) -> float:
        span = self.world.now - WARMUP
        if span <= 0:
            return 0.0
        sent = self.world.metrics["bytes_sent"] - self._bytes_at_warmup
        return round(sent * 8 / span / len(self.names), 1)

    def all_alive(self, world: World) -> bool:
        up = [n for n in self.names if world.nodes[n].up]
        for name in up:
            m = self.core(name).membership
            if any(m.state_of(o) != 0 for o in up if o != name):
                return False
        return True

    def routes_now(self) -> dict[tuple[str, str, str], tuple[str, ...] | None]:
        out: dict[tuple[str, str, str], tuple[str, ...] | None] = {}
        for name in self.names:
            if not self.world.nodes[name].up:
                continue
            election = self.core(name).election
            for (kind, dst), route in sorted(election.routes.items()):
                out[(name, kind, dst)] = route.hops if route is not None else None
        return out

    def on_best_fraction(self) -> float:
        """Share of (node, kind, destination) whose route is the best or within margin."""
        good = total = 0
        for name in self.names:
            if not self.world.nodes[name].up:
                continue
            core = self.core(name)
            for dst in core.peers:
                for kind in ("control", "bulk"):
                    total += 1
                    good += core.election.on_best(kind, dst, core.membership.state_of,
                                                  core.table.view)
        return round(good / max(1, total), 4)

    def first_death(self, victim: str, after: float) -> dict[str, float]:
        """Per node, when it first declared ``victim`` dead after ``after``."""
        seen: dict[str, float] = {}
        for t, node, member, state in self.member_events:
            if member == victim and state == "dead" and t >= after and node not in seen:
                seen[node] = t
        return seen

    def summary(self) -> dict[str, Any]:
        return {"false_positives": self.false_positives}
