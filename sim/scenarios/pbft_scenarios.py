"""PBFT scenarios (issue 5): benign faults, Byzantine replicas, and a Byzantine swarm.

Every scenario runs a federation of ``--nodes`` replicas (default 4, f = 1; use 7
for f = 2) under a ledger workload from the correct DCs, with the checkers of
:mod:`sim.hosts.pbft_cluster` after every event, then a quiet phase in which
every submitted request must execute everywhere within ``quiet`` seconds.
Byzantine replicas never exceed f; they are chosen among the DCs and, where the
attack needs it, include the primary of view 0 (:func:`primary0`: ``n00``, or the first name of a
``--federation`` file's DCs in sorted order).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from consensus.pbft.batch_time import TIME_BOUND
from consensus.pbft.messages import Commit, Prepare, PrePrepare
from sim import partitions
from sim.hosts.byzantine import (
    Combined,
    Equivocate,
    ForgeSignatures,
    Silent,
    StampTime,
    ViewChangeAttack,
)
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster, identity_for
from sim.nemesis import BENIGN_KINDS, Byzantine
from sim.scenario import Run, scenario
from sim.world import SimNode, World

FAULTS = 10.0
#: Quiet-phase bound: with the 1 s simulated base timeout, recovering from the
#: worst fault phase takes a few doubled view changes (1 + 2 + 4 + 8 s) plus
#: state transfer; 30 s is the bound every pending request must commit within.
QUIET = 30.0
PER_NODE = 5


def primary0(run: Run) -> str:
    """The primary of view 0: the first member by name (consensus.pbft.quorum)."""
    return min(run.names())


def _f(run: Run) -> int:
    return (run.nodes - 1) // 3


def _cluster(run: Run, byzantine: tuple[str, ...] = (), per_node: int = PER_NODE,
             pipeline: int = SIM_CONFIG.pipeline) -> PbftCluster:
    c = PbftCluster(run, config=attrs.evolve(SIM_CONFIG, pipeline=pipeline), byzantine=byzantine)
    c.workload(0.5, 0.8 * run.faults_until, per_node, run.rng)
    return c


def _pbft(name: str, description: str, faults: float = FAULTS, quiet: float = QUIET,
          kinds: tuple[str, ...] = BENIGN_KINDS) -> Callable[[Callable[[Run], None]],
                                                            Callable[[Run], None]]:
    return scenario(name, nodes=4, faults_until=faults, quiet=quiet, swarm_kinds=kinds,
                    description=description, min_nodes=4)


@_pbft("pbft-normal", "PBFT: commits in order with no faults")
def normal(run: Run) -> None:
    _cluster(run)


@_pbft("pbft-primary-crash", "PBFT: the primary crashes; a view change; it restarts and catches up")
def primary_crash(run: Run) -> None:
    _cluster(run)
    run.nemesis.crash(primary0(run), at=2.0, restart_at=7.0)


@_pbft("pbft-minority-partition", "PBFT: f replicas cut off, then healed")
def minority_partition(run: Run) -> None:
    c = _cluster(run)
    cut = run.rng.sample(c.names, _f(run))
    pairs = set().union(*(partitions.isolate(m, c.names) for m in cut))
    run.nemesis.partition(pairs, at=2.0, until=7.0, label="minority")


@_pbft("pbft-majority-partition", "PBFT: no side has 2f+1 (no progress), then healed")
def majority_partition(run: Run) -> None:
    c = _cluster(run)
    run.nemesis.partition(partitions.halves(c.names, run.rng), at=2.0, until=7.0,
                          label="halves")


def _byzantine(run: Run, name: str, hook: Callable[..., list[tuple[str, bytes, float]]]) -> None:
    """``name`` misbehaves from the start; the quiet phase turns it honest again."""
    run.nemesis.byzantine(name, hook, at=0.0)  # type: ignore[arg-type]


@_pbft("pbft-equivocating-primary", "PBFT: the primary sends different batches to backups")
def equivocating_primary(run: Run) -> None:
    p0 = primary0(run)
    c = _cluster(run, byzantine=(p0,))
    _byzantine(run, p0, Equivocate(identity_for(p0), p0, c.names))
    run.metric("convicted_primary0", lambda w: all(
        p0 in r.evidence.proofs for m in c.correct() if (r := c.replica(m))))


@_pbft("pbft-forged-signatures", "PBFT: a replica sends bad and borrowed signatures")
def forged_signatures(run: Run) -> None:
    bad = run.rng.choice(run.names())
    c = _cluster(run, byzantine=(bad,))
    _byzantine(run, bad, ForgeSignatures(run.world.rng("forge"), c.names, p=0.6))


@_pbft("pbft-replay", "PBFT: a replica replays and duplicates old messages")
def replay(run: Run) -> None:
    bad = run.rng.choice(run.names())
    _cluster(run, byzantine=(bad,))
    _byzantine(run, bad, Byzantine(run.world.rng("replay"), replay=0.5, duplicate=0.3,
                                   max_delay=2.0))


@_pbft("pbft-corrupt-cbor", "PBFT: a replica's frames have flipped bits")
def corrupt(run: Run) -> None:
    bad = run.rng.choice(run.names())
    _cluster(run, byzantine=(bad,))
    _byzantine(run, bad, Byzantine(run.world.rng("corrupt"), corrupt=0.5))


@_pbft("pbft-silent-primary", "PBFT: the primary stays silent; backups change view")
def silent_primary(run: Run) -> None:
    p0 = primary0(run)
    _cluster(run, byzantine=(p0,))
    _byzantine(run, p0, Silent())


def _vc_attack(run: Run, mode: str, flood: bool) -> None:
    p0 = primary0(run)
    c = _cluster(run, byzantine=(p0,))
    attack = ViewChangeAttack(identity_for(p0), p0, c.names, run.world.rng("vc"),
                              mode=mode, flood=flood)
    # silent as primary (forcing view changes), malicious in every view change
    _byzantine(run, p0, Combined(Silent((PrePrepare, Prepare, Commit)), attack))


@_pbft("pbft-forged-certificates", "PBFT: VIEW-CHANGEs carry forged prepared certificates")
def forged_certificates(run: Run) -> None:
    _vc_attack(run, "forged-certs", flood=False)


@_pbft("pbft-stale-checkpoints", "PBFT: VIEW-CHANGEs carry stale or unproven checkpoints")
def stale_checkpoints(run: Run) -> None:
    _vc_attack(run, "stale-checkpoint", flood=False)


@_pbft("pbft-view-flood", "PBFT: a replica floods VIEW-CHANGEs for huge views")
def view_flood(run: Run) -> None:
    _vc_attack(run, "forged-certs", flood=True)


@_pbft("pbft-far-time", "PBFT: the primary stamps its batches far from its clock "
                       "(--param shift=SECONDS, default an hour ahead); backups refuse and "
                       "change view", faults=100.0)
def far_time(run: Run) -> None:
    # The load starts after TIME_BOUND of virtual time, so that a batch stamped behind
    # the clocks is not clamped at the epoch (0) and still within the bound.
    p0 = primary0(run)
    c = PbftCluster(run, config=SIM_CONFIG, byzantine=(p0,))
    c.workload(TIME_BOUND + 5.0, run.faults_until - 10.0, PER_NODE, run.rng)
    liar = StampTime(identity_for(p0), p0, float(run.param("shift", 3600.0)))
    run.nemesis.byzantine(p0, liar, at=0.0)  # type: ignore[arg-type]
    run.metric("refused", lambda w: {
        m: {k: r.metrics.get(f"batch_time_{k}", 0) for k in ("ahead", "behind", "backwards")}
        for m in c.correct() if (r := c.replica(m))})
    run.metric("stamped", lambda w: liar.count)
    run.metric("ledger_clock", lambda w: {m: round(r.ledger.clock, 3)
                                          for m in c.correct() if (r := c.replica(m))})


class _TwinRouter:
    """The Twins network model: frames for ``of`` from the nodes in ``to_twin`` reach
    the twin instead, so each twin sees a different part of the federation (and,
    as primary, proposes different batches under the one key)."""

    def __init__(self, of: str, twin: str, to_twin: set[str]) -> None:
        self.of, self.twin, self.to_twin = of, twin, to_twin

    def __call__(self, world: World, node: SimNode, dst: str, msg: object,
                 raw: bytes) -> list[tuple[str, bytes, float]]:
        if dst == self.of and node.name in self.to_twin:
            return [(self.twin, raw, 0.0)]
        return [(dst, raw, 0.0)]


@_pbft("pbft-twins", "PBFT: two nodes run the primary's replica with one key (DiemBFT Twins)")
def twins(run: Run) -> None:
    c = _cluster(run)
    p0 = primary0(run)
    c.add_twin(p0, f"{p0}-twin")
    others = [m for m in c.names if m != p0]
    router = _TwinRouter(p0, f"{p0}-twin", set(run.rng.sample(others, len(others) // 2)))
    for name in others:
        run.world.nodes[name].tamper = router
    run.metric("convicted_primary0", lambda w: sorted(
        m for m in c.correct() if (r := c.replica(m)) and p0 in r.evidence.proofs))


def _random_attack(run: Run, rng: random.Random, name: str, c: PbftCluster) -> object:
    ident = identity_for(name)
    hooks: list[object] = []
    if rng.random() < 0.5:
        hooks.append(Equivocate(ident, name, c.names))
    if rng.random() < 0.4:
        hooks.append(ViewChangeAttack(ident, name, c.names, run.world.rng(f"vc/{name}"),
                                      mode=rng.choice(["forged-certs", "stale-checkpoint"]),
                                      flood=rng.random() < 0.5))
    if rng.random() < 0.3:
        hooks.append(ForgeSignatures(run.world.rng(f"forge/{name}"), c.names, p=0.3))
    if rng.random() < 0.3:
        hooks.append(Silent((PrePrepare, Prepare, Commit)))
    # Batch times far off (their own random stream, so the other draws of a seed stay).
    when = run.world.rng(f"time/{name}")
    if when.random() < 0.3:
        hooks.append(StampTime(ident, name, when.choice((-1, 1)) * when.uniform(90.0, 7200.0)))
    hooks.append(Byzantine(run.world.rng(f"byz/{name}"), drop=rng.uniform(0, 0.2),
                           delay=rng.uniform(0, 0.2), max_delay=2.0,
                           duplicate=rng.uniform(0, 0.2), replay=rng.uniform(0, 0.3),
                           corrupt=rng.uniform(0, 0.2)))
    return Combined(*hooks)


@scenario("pbft-swarm", nodes=4, faults_until=FAULTS, quiet=QUIET, swarm_kinds=BENIGN_KINDS,
          min_nodes=4,
          description="PBFT: f random Byzantine replicas plus random benign faults")
def swarm(run: Run) -> None:
    """f Byzantine replicas with a random mix of attacks (always the primary of view 0
    with probability 1/2) and a random schedule of partitions, crashes, clogs, lossy
    links and clock jumps on any node."""
    rng = run.rng
    names = run.names()
    f = _f(run)
    p0 = primary0(run)
    pool = [m for m in names if m != p0]
    bad = rng.sample(pool, f - 1) + [p0] if rng.random() < 0.5 else rng.sample(pool, f)
    # Replicas run one instance at a time by default (PbftConfig.pipeline); half the
    # runs keep two in flight, for the interleavings of concurrent sequence numbers
    # (their own random stream, so the other draws of a seed stay as they were).
    pipeline = run.world.rng("pbft/pipeline").choice((1, 2))
    c = _cluster(run, byzantine=tuple(sorted(bad)), per_node=3, pipeline=pipeline)
    for name in sorted(bad):
        run.nemesis.byzantine(name, _random_attack(run, rng, name, c),  # type: ignore[arg-type]
                              at=0.0)
    if not run.swarm:
        run.nemesis.swarm(names, run.faults_until, BENIGN_KINDS, count=rng.randint(1, 3))
