"""A simulated PBFT cluster for the replica's tests: build one, submit to it, let it settle."""

from __future__ import annotations

import attrs

from consensus.pbft.replica import Replica
from mesh import wire
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster
from sim.scenario import Run, ScenarioSpec
from tests.harness.ledger import register

SMALL = attrs.evolve(SIM_CONFIG, checkpoint_interval=4, window=8)


def cluster(seed: int = 1, n: int = 4, config=SMALL) -> PbftCluster:  # type: ignore[no-untyped-def]
    spec = ScenarioSpec("test", lambda r: None, n, 10.0, 10.0, (), "", 4)
    return PbftCluster(Run(spec, seed, n, False), config=config)


def submit(c: PbftCluster, name: str, cmd: object) -> int:
    out: list[int] = []

    def go(rep: Replica, now: float) -> list[object]:
        rid, actions = rep.submit(now, wire.encode(cmd))
        c.submitted[name].add(rid)
        out.append(rid)
        return actions  # type: ignore[return-value]

    assert c.world.invoke(name, "pbft", go, "submit")
    return out[0]


def register_many(c: PbftCluster, count: int, at: float = 0.1, step: float = 0.01) -> None:
    c.workload_end = max(getattr(c, "workload_end", 0.0), at + count * step)  # type: ignore[attr-defined]
    for i in range(count):
        name = c.names[i % len(c.names)]
        c.world.at(at + i * step, lambda w, i=i, name=name: submit(c, name, register(
            f"vm{i}", name)), f"submit {i}")


def run_until_settled(c: PbftCluster, until: float = 60.0) -> None:
    c.world.run(until=getattr(c, "workload_end", 0.0) + 0.001)
    assert c.world.run(until=until, predicate=lambda w: c.problem is None and c.settled(w)), (
        c.problem, {m: r.status() for m in c.names if (r := c.replica(m))})
    assert c.problem is None
