"""``dwcp bench sim``: how much faster than real time the simulator runs a federation.

16 DCs on the geo preset (sim/geo.py) run the real SWIM membership core
(mesh/gossip/membership.py) for ``--seconds`` of virtual time; every message is encoded,
crosses a simulated link and is decoded, every timer and event goes through the
event heap. ``speedup`` is virtual seconds per wall second. If the membership core
cannot be imported or raises under the simulator, the bench runs the simulator's
own replicated-counter core instead and says so in ``core`` and ``fallback``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from sim.geo import geo_links
from sim.world import SimError, SimNode, World

__all__ = ["register", "measure"]

#: Virtual seconds simulated: 10 membership push-pull periods (memberlist LAN: 30 s).
DEFAULT_SECONDS = 300.0
DEFAULT_NODES = 16


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sim", help="simulator speed: virtual seconds per wall second")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="virtual seconds")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 2 or args.seconds <= 0:
        print("dwcp bench sim: --nodes must be >= 2 and --seconds > 0")
        return 2
    result = measure(args.nodes, args.seconds, args.seed)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def _membership_build(names: list[str]) -> Callable[[SimNode], None]:
    from mesh.gossip.membership import Membership
    from mesh.gossip.statements import Statements
    from sim.hosts.pbft_cluster import identity_for

    identities = {n: identity_for(n) for n in names}
    keys = {n: i.public for n, i in identities.items()}

    def build(node: SimNode) -> None:
        peers = [n for n in names if n != node.name]
        statements = Statements(node.name, identities[node.name], keys)
        node.mount("membership", Membership(node.name, peers, node.rng("membership"),
                                            statements=statements),
                   accepts=("swim.",))

    return build


def _counter_build(names: list[str]) -> Callable[[SimNode], None]:
    from sim.hosts.counter_cores import CounterCore, CounterState

    def build(node: SimNode) -> None:
        node.mount("counter", CounterCore(node.name, names, node.rng("counter"), node.store),
                   accepts=(CounterState,))

    return build


def _timed(build: Callable[[SimNode], None], names: list[str], seconds: float,
           seed: int) -> tuple[World, float, float]:
    world = World(seed)
    for name in names:
        world.add_node(name, build)
    world.set_links(geo_links(names))
    started, cpu = time.perf_counter(), time.process_time()
    world.run(until=seconds)
    return world, time.perf_counter() - started, time.process_time() - cpu


def measure(nodes: int = DEFAULT_NODES, seconds: float = DEFAULT_SECONDS,
            seed: int = 1) -> dict[str, Any]:
    names = [f"dc{i:02d}" for i in range(nodes)]
    core = "mesh.gossip.membership.Membership (SWIM + Lifeguard)"
    fallback = None
    try:
        world, wall, cpu = _timed(_membership_build(names), names, seconds, seed)
    except (ImportError, SimError) as exc:
        fallback = f"{type(exc).__name__}: {exc}"[:300]
        core = "sim.hosts.counter_cores.CounterCore (G-Counter gossip + heartbeats)"
        world, wall, cpu = _timed(_counter_build(names), names, seconds, seed)
    result: dict[str, Any] = {
        "nodes": nodes,
        "core": core,
        "sim_seconds": seconds,
        "wall_seconds": round(wall, 4),
        "speedup": round(seconds / wall, 1),
        # CPU time of this process: the figure to compare on a machine shared with others.
        "cpu_seconds": round(cpu, 4),
        "speedup_cpu": round(seconds / max(cpu, 1e-9), 1),
        "events": world.events,
        "events_per_s": round(world.events / wall),
        "messages": world.metrics["delivered"],
        "bytes_sent": world.metrics["bytes_sent"],
        "notifications": len(world.notifications),
        "trace_hash": world.trace_hash(),
    }
    if fallback is not None:
        result["fallback"] = fallback
    return result
