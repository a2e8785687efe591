"""PBFT crash-point search (issue 14): crash replicas right after their k-th synced write.

A model-checking style sweep over persist boundaries instead of random crash
times. Each run picks a *focus* and a depth *k* from its seed, so consecutive seeds
walk every (focus, k) in turn (``CRASH_POINTS`` per cycle):

- ``normal``: victims crash at their k-th synced write after the workload starts
  (accepted PRE-PREPAREs, prepared certificates, the client's id blocks);
- ``view-change``: the primary of view 0 is cut off or crashes; victims crash at
  their k-th synced write after that (the view record of the VIEW-CHANGE, the
  one carrying the NEW-VIEW, the first writes of the new view);
- ``new-view``: the same fault, and victims crash right after their k-th write of
  the view record (k = 2: just after logging the NEW-VIEW, where issue 14 found
  certificates lost);
- ``checkpoint``: victims crash right after logging their k-th stable checkpoint;
- ``transfer``: a backup is cut off long enough to fall a checkpoint behind;
  after the heal it catches up by state transfer, and crashes at its k-th synced
  write from then on (other victims too).

Victims are 1 to f+1 replicas (chosen by the seed) that crash at the same depth,
the correlated crashes issue 14 found (f+1 replicas forgetting together); each
restarts after 0 to 1.5 s from what its store kept, and may crash once more at a
later depth. Every run also has lossy links and up to two random partitions,
cuts, clogs or crashes. Crash faults only: every replica is correct, so every
checker of :mod:`sim.hosts.pbft_cluster` applies to all of them, the promise
checker too (nothing a replica signs after a restart contradicts what it signed
before). ``--param focus=... --param k=...`` pins one crash point.
"""

from __future__ import annotations

import random

import attrs

from consensus.pbft.durable import ReplicaLog, ViewRecord
from mesh import wire
from sim import partitions
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster
from sim.network import Normal
from sim.scenario import Run, scenario
from sim.world import World

__all__ = ["FOCUSES", "CRASH_POINTS", "crash_point"]

FAULTS = 12.0
#: As for the other PBFT scenarios (sim/scenarios/pbft_scenarios.py): a few doubled
#: view changes plus state transfer fit in 30 s of quiet.
QUIET = 30.0
#: Commands in a run (from every DC in turn): enough for several checkpoints at K = 4
#: even when batches form; spread over the DCs, so a 7-DC run costs little more than
#: a 4-DC one.
COMMANDS = 24
#: Depths swept per focus: a victim makes 10-40 synced writes in a run's fault phase
#: (two per sequence number it takes part in, one or two per view change), a few per
#: view change or catch-up, one per stable checkpoint.
DEPTHS = {"normal": 20, "view-change": 12, "new-view": 4, "checkpoint": 4, "transfer": 12}
FOCUSES = tuple(DEPTHS)
#: Seeds in one walk over every (focus, k).
CRASH_POINTS = sum(DEPTHS.values())
#: Checkpoints every 4 seqnos, window 8 (the replica tests' scale): a run of a few
#: dozen commands makes several stable checkpoints, so checkpoint and state-transfer
#: boundaries occur in every run, not only in long ones.
CONFIG = attrs.evolve(SIM_CONFIG, checkpoint_interval=4, window=8)
#: Background faults drawn per run, as the swarm draws them (no Byzantine kind).
BACKGROUND = ("partition", "one_way", "cut", "clog", "degrade", "crash")


def crash_point(seed: int) -> tuple[str, int]:
    """The (focus, k) of ``seed``: seeds 0 .. CRASH_POINTS-1 walk every pair once."""
    i = seed % CRASH_POINTS
    for focus, depth in DEPTHS.items():
        if i < depth:
            return focus, i + 1
        i -= depth
    raise AssertionError("unreachable")


def _kind(key: str, value: bytes | None) -> str:
    """What a synced write logged, for the coverage metric."""
    if key == ReplicaLog.VIEW_KEY and value:
        rec = wire.decode(value, expect=(ViewRecord,))
        assert isinstance(rec, ViewRecord)
        return "new-view" if rec.new_view is not None else ("view" if rec.active else
                                                           "view-change")
    for prefix, name in ((ReplicaLog.CHECKPOINT_KEY, "checkpoint"),
                         (ReplicaLog.PREPREPARE_PREFIX, "pre-prepare"),
                         (ReplicaLog.PREPARED_PREFIX, "prepared"),
                         (ReplicaLog.COMMITTED_PREFIX, "committed")):
        if key.startswith(prefix):
            return name
    return key.split("/")[0]


class CrashPoints:
    """Arms crash points on the replicas' stores and records the ones that fired."""

    def __init__(self, c: PbftCluster, rng: random.Random, until: float) -> None:
        self.c = c
        self.world: World = c.world
        self.rng = rng
        self.until = until
        #: "node record step" of every crash that fired, in order: what the write logged,
        #: and what the step was handling
        self.hit: list[str] = []

    def arm(self, name: str, at: float, k: int, only: str | None = None,
            again: bool = False) -> None:
        """From virtual time ``at``, crash ``name`` right after its k-th synced write (of
        key ``only`` if given); restart it after 0-1.5 s; ``again``: once restarted, arm
        one more crash point at a random depth."""
        def start(world: World) -> None:
            store = world.nodes[name].store
            count = [0]

            def after_sync(key: str, _barriers: int) -> None:
                if world.now >= self.until or (only is not None and key != only):
                    return
                count[0] += 1
                if count[0] < k:
                    return
                store.after_sync = None
                self.hit.append(f"{name} {_kind(key, store.get(key))} {self._phase(name)}")
                world.crash(name)
                down = 0.0 if self.rng.random() < 0.5 else self.rng.uniform(0.05, 1.5)
                world.after(down, lambda w: self._restart(name, again), f"restart {name}")

            store.after_sync = after_sync

        self.world.at(at, start, f"arm crash point {name} k={k}")

    def _restart(self, name: str, again: bool) -> None:
        self.world.restart(name)
        if again and self.world.now < self.until:
            self.arm(name, self.world.now, self.rng.randint(1, 8))

    def _phase(self, name: str) -> str:
        """What the replica was doing in the step whose write it crashed after (the
        actions of a step run after the core made all of them, so its state is no guide)."""
        event = self.world.describe_event()
        for what, phase in (("pbft.state-reply", "installing-state"),
                            ("pbft.new-view", "new-view"),  # (it holds VIEW-CHANGEs)
                            ("pbft.view-change", "view-change"),
                            ("pbft.checkpoint", "checkpoint"),
                            ("TimerFired", "timer"),
                            ("submit", "submit")):
            if what in event:
                return phase
        return "normal-case"


@scenario("pbft-crashpoints", nodes=4, faults_until=FAULTS, quiet=QUIET, min_nodes=4,
          description="PBFT: replicas crash right after their k-th synced write (by seed: "
                      "normal case, view change, new view, checkpoint, state transfer)")
def crashpoints(run: Run) -> None:
    seed_focus, seed_k = crash_point(run.seed)
    focus = run.param("focus", seed_focus)
    k = int(run.param("k", seed_k))
    if focus not in DEPTHS:
        raise ValueError(f"--param focus={focus!r}: expected one of {', '.join(FOCUSES)}")
    rng = run.rng
    pipeline = run.world.rng("pbft/pipeline").choice((1, 2))
    c = PbftCluster(run, config=attrs.evolve(CONFIG, pipeline=pipeline))
    names = c.names
    c.workload(0.5, 0.8 * run.faults_until, max(2, COMMANDS // len(names)), rng)
    f = (len(names) - 1) // 3
    points = CrashPoints(c, run.world.rng("crashpoints"), run.faults_until)
    _lossy_links(run, names, rng)
    if not run.swarm:
        run.nemesis.swarm(names, run.faults_until, BACKGROUND, count=rng.randint(0, 2))
    victims = rng.sample(names, rng.randint(1, f + 1))
    start = 1.0
    only: str | None = None
    if focus in ("view-change", "new-view"):
        p0 = min(names)  # the primary of view 0 (consensus.pbft.quorum orders by name)
        start = rng.uniform(1.5, 4.0)
        only = ReplicaLog.VIEW_KEY if focus == "new-view" else None
        if rng.random() < 0.5:
            run.nemesis.crash(p0, at=start, restart_at=start + rng.uniform(2.0, 6.0))
        else:
            run.nemesis.partition(partitions.isolate(p0, names), at=start,
                                  until=start + rng.uniform(2.0, 6.0), label="primary cut off")
        victims = rng.sample([m for m in names if m != p0], rng.randint(1, f + 1))
    elif focus == "checkpoint":
        only = ReplicaLog.CHECKPOINT_KEY
    elif focus == "transfer":
        laggard = rng.choice(names[1:])
        start = rng.uniform(5.0, 7.0)  # the heal: it catches up from here
        run.nemesis.partition(partitions.isolate(laggard, names), at=0.5, until=start,
                              label="laggard cut off")
        others = [m for m in names if m != laggard]
        victims = [laggard, *rng.sample(others, rng.randint(0, f))]
    for name in victims:
        points.arm(name, start, k, only, again=rng.random() < 0.3)
    run.metric("crash_point", lambda w: {"focus": focus, "k": k, "victims": sorted(victims),
                                         "hit": points.hit})


def _lossy_links(run: Run, names: list[str], rng: random.Random) -> None:
    """A few links drop, duplicate and reorder frames for most of the fault phase."""
    pairs = [(a, b) for a in names for b in names if a < b]
    for a, b in rng.sample(pairs, rng.randint(1, max(1, len(pairs) // 3))):
        spec = run.world.link(a, b).spec.evolve(
            loss=rng.uniform(0.01, 0.15), duplicate=rng.uniform(0.0, 0.05),
            reorder=rng.uniform(0.0, 0.1), latency=Normal(rng.uniform(0.005, 0.05), 0.005))
        run.nemesis.degrade(a, b, spec, at=0.5, until=0.9 * run.faults_until)
