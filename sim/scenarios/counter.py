"""Scenarios of the simulator's own cores (sim/hosts/counter_cores.py): a replicated counter with a
heartbeat detector, and an echo protocol measuring the geo preset. Between them they use
every fault the nemesis has, so they are the simulator's own end-to-end tests."""

from __future__ import annotations

import random
from collections.abc import Callable

from sim import partitions
from sim.checkers import notify_checker
from sim.geo import assign_regions, geo_links, rtt_ms
from sim.hosts.counter_cores import CounterCore, CounterState, EchoCore
from sim.nemesis import SWARM_KINDS, Byzantine
from sim.network import LinkSpec, LogNormal
from sim.scenario import Run, scenario
from sim.world import NotifyRecord, SimNode, World

#: Mean seconds between a node's client increments during the fault phase.
INCREMENT_EVERY = 2.0
#: Echo period in the counter scenarios: the echo core is there to exercise multi-core
#: dispatch, every 5 s keeps it cheap next to the 1 s gossip.
ECHO_EVERY = 5.0


class CounterWorld:
    """Nodes running CounterCore (+ EchoCore), a random increment workload and the
    counter's invariants: nobody learns a count its owner never acknowledged, a restart
    never loses an acknowledged increment, and after the faults every live node holds
    every acknowledged count with nobody suspected."""

    def __init__(self, run: Run, echo_every: float = ECHO_EVERY) -> None:
        self.run = run
        self.world = run.world
        self.names = run.names()
        self.acked: dict[str, int] = dict.fromkeys(self.names, 0)
        names = self.names

        def build(node: SimNode) -> None:
            node.mount("counter", CounterCore(node.name, names, node.rng("counter"), node.store),
                       accepts=(CounterState,))
            node.mount("echo", EchoCore(node.name, names, interval=echo_every),
                       accepts=("sim.echo.",))

        for name in names:
            self.world.add_node(name, build)
        notify_checker(self.world, "acknowledged-only", self._inspect)
        run.liveness("every live node holds every acknowledged count", self._converged)
        run.liveness("no live node suspects a live peer", self._nobody_suspected)
        run.metric("acknowledged", lambda w: sum(self.acked.values()))
        run.metric("rejected_frames", lambda w: sum(
            1 for r in w.notifications if r.kind == "rejected"))

    def workload(self, until: float) -> None:
        rng = self.world.rng("workload")
        for name in self.names:
            t = rng.expovariate(1.0 / INCREMENT_EVERY)
            while t < until:
                self.world.at(t, self._increment(name), f"increment {name}")
                t += rng.expovariate(1.0 / INCREMENT_EVERY)

    @staticmethod
    def _increment(name: str) -> Callable[[World], None]:
        def client(world: World) -> None:
            world.invoke(name, "counter", lambda core, now: core.increment(now), "increment")

        return client

    def _inspect(self, record: NotifyRecord) -> str | None:
        if record.kind == "ack":
            self.acked[record.node] = max(self.acked[record.node], record.detail)
        elif record.kind == "learned":
            origin, count = record.detail
            if count > self.acked.get(origin, 0):
                return f"learned {origin}={count}, but {origin} acknowledged only " \
                       f"{self.acked.get(origin, 0)}"
        elif record.kind == "started" and record.detail < self.acked[record.node]:
            return f"restarted with {record.detail}, lost acknowledged increments " \
                   f"up to {self.acked[record.node]}"
        return None

    def _live(self, world: World) -> list[CounterCore]:
        return [n.core("counter") for n in world.nodes.values() if n.up]

    def _converged(self, world: World) -> bool:
        want = {k: v for k, v in self.acked.items() if v}
        return all({k: v for k, v in c.counts.items() if v} == want for c in self._live(world))

    def _nobody_suspected(self, world: World) -> bool:
        return all(not c.suspected for c in self._live(world))


@scenario("counter-calm", nodes=5, faults_until=30.0, quiet=30.0, swarm_kinds=SWARM_KINDS,
          description="replicated counter on the geo preset, no faults unless --swarm")
def counter_calm(run: Run) -> None:
    cw = CounterWorld(run)
    run.world.set_links(geo_links(cw.names, run.regions()))
    cw.workload(run.faults_until)


@scenario("counter-partitions", nodes=6, faults_until=120.0, quiet=60.0, min_nodes=4,
          swarm_kinds=SWARM_KINDS,
          description="halves, isolate, bridge, ring, one-way partitions and link cuts")
def counter_partitions(run: Run) -> None:
    cw = CounterWorld(run)
    names, rng, nemesis = cw.names, run.rng, run.nemesis
    run.world.set_links(geo_links(names, run.regions()))
    cw.workload(run.faults_until)
    nemesis.partition(partitions.halves(names, rng), 5.0, 20.0, "halves")
    nemesis.partition(partitions.isolate(rng.choice(names), names), 25.0, 40.0, "isolate")
    nemesis.partition(partitions.bridge(names, rng), 45.0, 60.0, "bridge")
    nemesis.partition(partitions.ring(names, rng), 65.0, 80.0, "ring")
    half = len(names) // 2
    nemesis.partition(partitions.one_way(names[:half], names[half:]), 85.0, 100.0, "one-way")
    a, b = rng.sample(names, 2)
    nemesis.partition(partitions.cut(a, b), 100.0, 115.0, "cut")
    c, d = rng.sample(names, 2)
    nemesis.partition(partitions.cut(c, d, both=False), 100.0, None, "one-way cut")


@scenario("counter-crashes", nodes=5, faults_until=120.0, quiet=60.0, min_nodes=3,
          swarm_kinds=SWARM_KINDS,
          description="crash/restart, clogged links, lossy reordering links, clock offsets")
def counter_crashes(run: Run) -> None:
    cw = CounterWorld(run)
    names, rng, nemesis, world = cw.names, run.rng, run.nemesis, run.world
    world.set_links(geo_links(names, run.regions()))
    cw.workload(run.faults_until)
    for i, name in enumerate(rng.sample(names, min(3, len(names)))):
        down = 10.0 + 30.0 * i + rng.uniform(0.0, 5.0)
        nemesis.crash(name, down, down + rng.uniform(2.0, 15.0))
    nemesis.crash(rng.choice(names), 105.0, None)  # restarted only by the quiet phase
    a, b = rng.sample(names, 2)
    nemesis.clog(a, b, 15.0, 35.0)
    c, d = rng.sample(names, 2)
    bad = LinkSpec(latency=LogNormal(0.05, 0.8), bandwidth=2e6, loss=0.2, duplicate=0.1,
                   reorder=0.3, queue_bytes=64 * 1024)
    nemesis.degrade(c, d, bad, 20.0, 90.0)
    for name in rng.sample(names, 2):
        nemesis.clock(name, rng.uniform(-60.0, 60.0), rng.uniform(5.0, 50.0),
                      rng.uniform(60.0, 110.0))


def _stale_state(rng: random.Random, names: list[str]):  # type: ignore[no-untyped-def]
    """Equivocation: half the peers get a stale view (the empty one), half the truth."""
    from sim.hosts.counter_cores import counts_digest
    fooled = set(rng.sample(names, len(names) // 2))

    def rewrite(dst: str, msg: object) -> object:
        if dst in fooled and isinstance(msg, CounterState):
            return CounterState(msg.origin, (), msg.reply, counts_digest(msg.origin, ()))
        return None

    return rewrite


@scenario("counter-byzantine", nodes=5, faults_until=90.0, quiet=60.0, min_nodes=3,
          swarm_kinds=SWARM_KINDS,
          description="one node drops, delays, duplicates, replays, corrupts, equivocates, "
                      "then goes silent")
def counter_byzantine(run: Run) -> None:
    cw = CounterWorld(run)
    names, world, nemesis = cw.names, run.world, run.nemesis
    world.set_links(geo_links(names, run.regions()))
    cw.workload(run.faults_until)
    liar = run.rng.choice(names)
    others = [n for n in names if n != liar]
    behaviour = Byzantine(world.rng(f"byzantine/{liar}"), drop=0.1, delay=0.2, max_delay=3.0,
                          duplicate=0.2, replay=0.3, corrupt=0.3,
                          equivocate=_stale_state(run.rng, others))
    nemesis.byzantine(liar, behaviour, 5.0, 60.0)
    nemesis.byzantine(liar, Byzantine(world.rng("silent"), silent=True), 60.0, 80.0)
    run.metric("byzantine", lambda w: dict(behaviour.counts))


@scenario("echo-geo", nodes=16, faults_until=10.0, quiet=20.0, swarm_kinds=(),
          description="echo over the 16-region geo preset: measured RTTs match the table")
def echo_geo(run: Run) -> None:
    world, names = run.world, run.names()
    regions = run.regions() or assign_regions(names)
    world.set_links(geo_links(names, regions))

    def build(node: SimNode) -> None:
        node.mount("echo", EchoCore(node.name, names), accepts=("sim.echo.",))

    for name in names:
        world.add_node(name, build)

    def inspect(record: NotifyRecord) -> str | None:
        if record.kind != "rtt":
            return None
        peer, rtt = record.detail
        published = rtt_ms(regions[record.node], regions[peer]) / 1000
        back = rtt_ms(regions[peer], regions[record.node]) / 1000
        low = 0.9 * (published + back) / 2
        high = 1.2 * (published + back) / 2 + 0.001
        if not low <= rtt <= high:
            return f"RTT to {peer} {rtt * 1000:.1f} ms outside [{low * 1000:.1f}, " \
                   f"{high * 1000:.1f}] ms of the published figures"
        return None

    notify_checker(world, "rtt-matches-geo", inspect)
    run.liveness("every node measured every peer", lambda w: all(
        len(n.core("echo").rtt) == len(names) - 1 for n in w.nodes.values()))
