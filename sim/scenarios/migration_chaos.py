"""``migration-chaos`` (issue 7): many VMs migrating across 7 DCs under partitions,
crashes and a Byzantine DC, with an oracle on every step.

Every DC runs the real node core (:class:`federation.migration.dc_core.NodeCore`: the PBFT
replica over a crash-consistent store and the migration sessions) hosted by
:class:`sim.hosts.migration_dc.DcHost`, with VMs modelled as pages
(:mod:`sim.hosts.migration_vms`) that a seeded writer keeps dirtying, and rounds
carried as page chunks over the simulated WAN (so bandwidth decides round times).

Workload (from the seed): ``vms`` VMs registered at random DCs, then ``migrations``
migration requests at random times, each moving a random VM to a random other DC.
Faults (from the seed): partitions (isolate one DC, halves, a cut), crashes of DCs
that are the source or target of a migration in flight, one crash aimed at the moment
a session enters a drawn phase (source fenced, target verified, ...), each restarted a
few seconds later from its store (the sessions' restore rules then resume or abort),
and one Byzantine DC strike (equivocate, corrupt, replay or silent). ``--swarm`` adds
random benign faults on top.

Metrics (``metrics.migration``): migrations by ledger outcome, aborts by the first
reason a side gave, and ``max_downtime``: the longest time a VM stood still from its
fence until it ran again anywhere (at the target after a commit, at the source after
an abort).

Oracle, after every event (:class:`Oracle`):

- every honest ledger agrees, at every executed seq, on every VM's owner and epoch
  (one owner per VM is the ledger's own invariant, asserted as it executes), and a
  VM's epoch never goes down from one seq to a later one;
- a VM never runs at two DCs, and runs only at a DC whose ledger says it owns it;
- a VM started after a commit holds exactly the pages its source held at the fence,
  i.e. what its writer last wrote before the fence;
- quiet phase: within ``QUIET`` seconds every migration is committed or aborted in
  every ledger, every session has ended, the ledgers are equal, and each VM runs at
  its owner.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from typing import Any

from consensus.ledger import ImportVm, Ledger, MigrateVm, RegisterVm
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.replica import Replica
from federation.migration.rollout import RolloutError
from federation.migration.vocabulary import MigrationError, MigrationOffer, MigrationRoundDone
from mesh.links.modes import Mode, classify
from sim import partitions
from sim.geo import REGIONS, geo_links
from sim.hosts.byzantine import Combined, Equivocate, Silent
from sim.hosts.migration_dc import HOST_TAGS, DcHost
from sim.hosts.migration_vms import LAYOUT, VmWorld, Writer
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner
from sim.hosts.pbft_cluster import SIM_CONFIG, identity_for
from sim.nemesis import Byzantine
from sim.network import Normal
from sim.scenario import Run, scenario
from sim.world import NotifyRecord, SimNode, World

__all__ = ["Oracle", "FAULTS", "QUIET", "STRIKES"]

#: Fault phase: long enough for a dozen migrations to overlap two or three faults.
FAULTS = 30.0
#: Quiet-phase bound. The slowest honest ending: a fenced source waits PEER_DOWN_GRACE
#: (30 s) plus its fence slack before aborting, its abort may need a PBFT view change
#: (1 + 2 + 4 s with SIM_CONFIG) and LEDGER_RESUBMIT (10 s); 90 s covers that twice over.
QUIET = 90.0
#: Seconds between two writer ticks (the guests' writes are batched per tick): under the
#: datacenter downtime target (0.5 s, federation.migration.vocabulary.LIMITS), so every pre-copy
#: decision sees fresh writes; finer ticks only cost events.
WRITE_TICK = 0.2
#: Page writes per second per VM: a guest dirtying ~0.4 MB/s, a light database load.
WRITE_RATE = 100.0
#: The tight downtime limit half the migrations run under (a qemu guest's is 300 ms; the
#: simulated VMs are 512 KiB, so their final rounds are a few ms on a fast link): low
#: enough that on the slower links the round policy throttles the guest and stops early.
TIGHT_DOWNTIME = 0.005
#: One-way latency of two DCs in one region (the geo table has 0 ms there): the
#: datacenter link of sim.network.
SAME_REGION = Normal(0.00025, 0.00005, 0.0001)
#: Transfer versions every simulated DC offers: v1 only (pages are modelled, not HDE).
_VERSIONS = (1,)
#: What the Byzantine DC does in its strike (``--param strike=...`` picks one).
STRIKES = ("equivocate", "corrupt", "replay", "silent")
#: (role, phase) pairs one crash per run is aimed at: the moments the restore rules of
#: federation.migration.restore treat differently.
_AIMED = (("source", "begun"), ("source", "precopy"), ("source", "fenced"),
          ("source", "final"), ("source", "verifying"), ("target", "precopy"),
          ("target", "final"), ("target", "verified"))


class Oracle:
    """The checkers of the module docstring, fed by the hosts and the notifications."""

    def __init__(self, world: World, vms: VmWorld, honest: list[str]) -> None:
        self.world = world
        self.vms = vms
        self.honest = set(honest)
        self.problem: str | None = None
        #: vm -> sorted seqs, and (vm, seq) -> (owner, epoch) at that seq
        self.seqs: dict[str, list[int]] = {}
        self.at_seq: dict[tuple[str, int], tuple[str, int]] = {}
        self.batch_at: dict[int, tuple[bytes, str]] = {}
        self.outcomes: dict[str, int] = {}
        #: migration id -> why the first side to give up gave up
        self.abort_reason: dict[str, str] = {}

    def check(self, _world: World) -> str | None:
        return self.problem or self.vms.facts.problem

    def fail(self, message: str) -> None:
        if self.problem is None:
            self.problem = message

    def on_ledger(self, host: DcHost) -> None:
        """``host``'s ledger executed up to a new seq."""
        ledger = host.replica.ledger
        seq = host.replica.last_exec
        if host.me in self.honest:
            for vm, rec in ledger.vms.items():
                self._owner_at(host.me, vm, seq, rec.owner, rec.epoch)
        for copy in self.vms.at(host.me):
            if copy.state == "running" and ledger.owner(copy.vm) != host.me:
                self.fail(f"{copy.vm} runs at {host.me}, whose ledger (seq {seq}) says "
                          f"{ledger.owner(copy.vm)} owns it")

    def _owner_at(self, dc: str, vm: str, seq: int, owner: str, epoch: int) -> None:
        known = self.at_seq.get((vm, seq))
        if known is not None:
            if known != (owner, epoch):
                self.fail(f"ledgers disagree on {vm} at seq {seq}: {known} vs "
                          f"{(owner, epoch)} at {dc}")
            return
        self.at_seq[(vm, seq)] = (owner, epoch)
        seqs = self.seqs.setdefault(vm, [])
        i = bisect.bisect(seqs, seq)
        if i and self.at_seq[(vm, seqs[i - 1])][1] > epoch:
            self.fail(f"epoch of {vm} went down: {self.at_seq[(vm, seqs[i - 1])][1]} at seq "
                      f"{seqs[i - 1]}, {epoch} at seq {seq} ({dc})")
        if i < len(seqs) and self.at_seq[(vm, seqs[i])][1] < epoch:
            self.fail(f"epoch of {vm} went down: {epoch} at seq {seq} ({dc}), "
                      f"{self.at_seq[(vm, seqs[i])][1]} at seq {seqs[i]}")
        seqs.insert(i, seq)

    def on_notify(self, rec: NotifyRecord) -> None:
        if rec.kind == "pbft.executed" and rec.node in self.honest:
            seq, digest = rec.detail["seq"], rec.detail["digest"]
            first = self.batch_at.setdefault(seq, (digest, rec.node))
            if first[0] != digest:
                self.fail(f"PBFT agreement: seq {seq} differs at {first[1]} and {rec.node}")
        elif rec.kind == "migration.aborting":
            self.abort_reason.setdefault(rec.detail["migration_id"],
                                         f"{rec.node}: {rec.detail['reason']}")
        elif rec.kind == "migration.done" and rec.detail.role == "source":
            out = rec.detail.outcome
            self.outcomes[out] = self.outcomes.get(out, 0) + 1

    def aborts_by_reason(self, ledger: Ledger) -> dict[str, int]:
        """Aborted migrations in ``ledger`` by the first reason a side gave."""
        counts: dict[str, int] = {}
        for mid, rec in ledger.migrations.items():
            if rec.state == "aborted":
                why = self.abort_reason.get(mid, "no side gave a reason")
                role = "source" if why.startswith(rec.source + ":") else "target"
                reason = f"{role}: {_reason(why.split(': ', 1)[-1])}"
                counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items()))


def _reason(text: str) -> str:
    """An abort reason without the DC names and figures in it, for counting."""
    return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"\bn\d+\b", "DC", text))[:80]


class Federation:
    """The 7 DCs, their hosts and the workload (one per run)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.world = run.world
        #: Receivers get the sent message objects (World.decode_frames, as PbftCluster
        #: does): the bytes are still encoded, carried and traced, tampered frames (the
        #: Byzantine DC's) still decoded; the decode of every frame was a tenth of a run.
        self.world.decode_frames = bool(run.param("decode_frames", False))
        self.names = run.names()
        self.keys = {m: identity_for(m).public for m in self.names}
        self.vms = VmWorld(lambda: self.world.now)
        self.bug = str(run.param("bug", ""))
        self.oracle: Oracle | None = None
        self.mode: dict[tuple[str, str], Mode] = {}
        self.vm_names: list[str] = []
        self.planned = 0
        self.refused = 0
        #: the operator who imports and migrates (the scenario plays the people)
        self.operator = OperatorSigner("ops", prefix="chaos")
        #: the downtime limit of each migration's VM, drawn from a stream of its own (the
        #: other draws stay as they were): None (the link mode's) or a running guest's
        #: tight one, under which the round policy throttles and stops early
        self._limits = self.world.rng("downtime-limit")

    def host(self, name: str) -> DcHost | None:
        node = self.world.nodes[name]
        return node.core("node") if node.up and "node" in node.cores else None

    def build(self, node: SimNode) -> None:
        # a restart (after any crash, ours or the swarm's): the DC's VM processes died
        self.vms.crash(node.name)
        replica = Replica(node.name, identity_for(node.name), self.keys, ReplicaLog(node.store),
                          node.rng("pbft"), SIM_CONFIG, SIM_OPERATORS)
        me = node.name

        def mode_of(dst: str) -> Mode | None:
            return self.mode.get((me, dst))

        host = DcHost(me, replica, self.vms, mode_of, DcHost.stored_records(node.store),
                      self.bug)
        if self.oracle is not None:
            host.on_ledger = self.oracle.on_ledger
        node.mount("node", host, accepts=HOST_TAGS)

    def links(self) -> None:
        rng = self.run.rng
        drawn = {m: rng.choice(REGIONS[:10]) for m in self.names}
        regions = self.run.regions() or drawn
        bandwidth = rng.choice((1e9, 200e6, 50e6))
        specs = geo_links(self.names, regions, bandwidth=bandwidth)
        for pair, spec in specs.items():
            if spec.latency.mean == 0.0:
                specs[pair] = spec.evolve(latency=SAME_REGION)
            rtt = 2000.0 * specs[pair].latency.mean
            self.mode[pair] = classify(self.run.mode_limits(), rtt, bandwidth / 1e6, 0.0)
        self.world.set_links(specs)

    # ------------------------------------------------------------------ workload

    def reference(self) -> Ledger | None:
        """The ledger of the honest live DC that executed the most."""
        best: DcHost | None = None
        for m in self.names:
            h = self.host(m)
            if h is not None and (best is None or h.replica.last_exec > best.replica.last_exec):
                best = h
        return best.replica.ledger if best is not None else None

    def register(self, vm: str, owner: str) -> None:
        self.vm_names.append(vm)
        self.vms.create(owner, vm)

        def go(world: World) -> None:
            auth = self.operator.authorize(ImportVm(vm, owner, f"/images/{vm}"), world.now)
            world.invoke(owner, "node", lambda h, now: h.invoke(
                now, lambda c, t: c.submit(t, RegisterVm(vm, owner, auth))[1]), f"register {vm}")

        self.world.at(0.05, go, f"register {vm}")

    def migrate(self, at: float, k: int, vm: str, draw: int) -> None:
        def go(world: World) -> None:
            ledger = self.reference()
            owner = ledger.owner(vm) if ledger is not None else None
            if ledger is None or owner is None:
                self.refused += 1
                return
            others = [m for m in self.names if m != owner]
            target = others[draw % len(others)]
            mid = f"m{k:03d}-{vm}"
            limit = self.downtime_limit()
            # the operator moves the VM from where the ledger has it (source and epoch)
            intent = MigrateVm(vm, target, owner, ledger.epoch(vm) or 0)
            auth = self.operator.authorize(intent, world.now)

            def plan(h: DcHost, now: float) -> list[Any]:
                try:
                    return h.invoke(now, lambda c, t: c.plan_migration(
                        t, mid, vm, target, LAYOUT, _VERSIONS, _VERSIONS, auth,
                        downtime_limit=limit))
                except (MigrationError, RolloutError):
                    self.refused += 1
                    return []

            self.planned += 1
            if not world.invoke(owner, "node", plan, f"migrate {vm} to {target}"):
                self.refused += 1

        self.world.at(at, go, f"migrate {vm}")

    def downtime_limit(self) -> float | None:
        """A migration's VM downtime limit: ``--param downtime_limit=S`` for all, else
        drawn: half the migrations TIGHT_DOWNTIME (a guest's own limit), half the mode's."""
        given = self.run.param("downtime_limit", None)
        if given is not None:
            return float(given)
        return TIGHT_DOWNTIME if self._limits.random() < 0.5 else None

    # ------------------------------------------------------------------ faults

    def busy_dcs(self) -> list[str]:
        """DCs that are the source or target of a session still running."""
        busy: list[str] = []
        for m in self.names:
            h = self.host(m)
            if h is not None and any(not s.done for s in h.core.sessions.values()):
                busy.append(m)
        return busy

    def crash_now(self, victim: str, down: float) -> None:
        """Crash ``victim`` now (its VMs stop with it) and restart it ``down`` s later."""
        world = self.world
        self.run.nemesis.crash(victim, at=world.now, restart_at=world.now + down)
        world.at(world.now, lambda w: self.vms.crash(victim), f"VMs of {victim} stop")

    def crash_busy(self, at: float, down: float, draw: int) -> None:
        def go(world: World) -> None:
            busy = self.busy_dcs() or [m for m in self.names if world.nodes[m].up]
            if busy:
                self.crash_now(busy[draw % len(busy)], down)

        self.world.at(at, go, "crash a busy DC")

    def crash_in_phase(self, role: str, phase: str, down: float, until: float) -> None:
        """Crash the first DC whose session of ``role`` enters ``phase`` before ``until``."""
        fired: list[str] = []

        def listen(rec: NotifyRecord) -> None:
            if fired or rec.kind != "migration.progress" or rec.time > until:
                return
            if rec.detail.role == role and rec.detail.phase == phase:
                fired.append(rec.node)
                self.crash_now(rec.node, down)

        self.world.on_notify(listen)

    def settled(self, world: World) -> bool:
        hosts = [self.host(m) for m in self.names]
        if any(h is None for h in hosts):
            return False
        live = [h for h in hosts if h is not None]
        if len({h.replica.last_exec for h in live}) != 1:
            return False
        for h in live:
            if h.core.unrestored or any(not s.done for s in h.core.sessions.values()):
                return False
        ledger = live[0].replica.ledger
        if any(rec.state == "begun" for rec in ledger.migrations.values()):
            return False
        for vm in self.vm_names:
            owner = ledger.owner(vm)
            if owner is None or self.vms.facts.running.get(vm) != [owner]:
                return False
            if self.vms.copies[(owner, vm)].throttle:
                return False  # a throttle outlived its migration
        return len({h.replica.ledger.state_digest() for h in live}) == 1

    def summary(self, world: World) -> dict[str, Any]:
        ledger = self.reference()
        states: dict[str, int] = {}
        if ledger is not None:
            for rec in ledger.migrations.values():
                states[rec.state] = states.get(rec.state, 0) + 1
        oracle = self.oracle
        return {
            "vms": len(self.vm_names), "planned": self.planned, "refused": self.refused,
            "ledger": states,
            "sessions": dict(sorted(oracle.outcomes.items())) if oracle else {},
            "aborts_by_reason": oracle.aborts_by_reason(ledger) if oracle and ledger else {},
            "max_downtime": round(self.vms.facts.max_downtime, 6),
            "page_writes": self.vms.writes,
            "throttles": self.vms.throttles,
        }


def _lie(dst: str, msg: Any) -> Any:
    """Equivocation in the migration protocol: another root, another epoch."""
    if isinstance(msg, MigrationRoundDone) and msg.final:
        return MigrationRoundDone(msg.migration_id, msg.round, True, bytes(32))
    if isinstance(msg, MigrationOffer):
        return MigrationOffer(msg.migration_id, msg.vm, msg.source, msg.target, msg.epoch + 1,
                              msg.layout, msg.version)
    return None


def _strike(run: Run, bad: str, names: list[str], mode: str) -> Callable[..., Any]:
    rng = run.world.rng(f"strike/{bad}")
    if mode == "equivocate":
        return Combined(Equivocate(identity_for(bad), bad, names),
                        Byzantine(rng, equivocate=_lie))
    if mode == "corrupt":
        return Byzantine(rng, corrupt=0.3)
    if mode == "replay":
        return Byzantine(rng, replay=0.4, duplicate=0.2, max_delay=2.0)
    return Silent()


@scenario("migration-chaos", nodes=7, faults_until=FAULTS, quiet=QUIET, min_nodes=7,
          description="VMs migrate across 7 DCs under partitions, crashes and a Byzantine DC")
def migration_chaos(run: Run) -> None:
    if (run.nodes - 1) % 3:
        raise ValueError(f"migration-chaos runs PBFT: --nodes must be 3f+1, got {run.nodes}")
    fed = Federation(run)
    world, rng, names = run.world, run.rng, fed.names
    bad = rng.choice(names)
    fed.oracle = oracle = Oracle(world, fed.vms, [m for m in names if m != bad])
    fed.links()
    for name in names:
        world.add_node(name, fed.build)
    world.on_notify(oracle.on_notify)
    run.add_checker("migration-oracle", oracle.check)
    writer = Writer(fed.vms, world.rng("writer"), float(run.param("write_rate", WRITE_RATE)),
                    lambda dc: world.nodes[dc].up)

    def tick(w: World) -> None:
        writer.tick(WRITE_TICK)
        w.after(WRITE_TICK, tick, "write")

    world.at(WRITE_TICK, tick, "write")
    for i in range(int(run.param("vms", rng.randint(10, 14)))):
        fed.register(f"vm{i:02d}", rng.choice(names))
    until = run.faults_until
    for k in range(int(run.param("migrations", rng.randint(10, 16)))):
        fed.migrate(rng.uniform(1.0, 0.85 * until), k, rng.choice(fed.vm_names),
                    rng.randrange(1 << 16))
    if run.param("faults", True):
        for _ in range(rng.randint(1, 2)):
            at = rng.uniform(2.0, 0.8 * until)
            shape = rng.choice(("isolate", "halves", "cut"))
            a, b = rng.sample(names, 2)
            pairs = (partitions.isolate(a, names) if shape == "isolate"
                     else partitions.halves(names, rng) if shape == "halves"
                     else partitions.cut(a, b))
            run.nemesis.partition(pairs, at=at, until=at + rng.uniform(2.0, 8.0), label=shape)
        for _ in range(rng.randint(1, 2)):
            fed.crash_busy(rng.uniform(2.0, 0.85 * until), rng.uniform(1.0, 8.0),
                           rng.randrange(1 << 16))
        role, phase = rng.choice(_AIMED)
        fed.crash_in_phase(role, phase, rng.uniform(1.0, 8.0), 0.85 * until)
        run.metric("aimed_crash", lambda w: f"{role} in {phase}")
        mode = str(run.param("strike", rng.choice(STRIKES)))
        if mode not in STRIKES:
            raise ValueError(f"--param strike={mode!r}: one of {', '.join(STRIKES)}")
        at = rng.uniform(2.0, 0.5 * until)
        length = float(run.param("strike_for", rng.uniform(5.0, 10.0)))
        run.nemesis.byzantine(bad, _strike(run, bad, names, mode),  # type: ignore[arg-type]
                              at=at, until=at + length)
        run.metric("byzantine", lambda w: f"{bad} {mode}")
    run.liveness("every migration ended and every VM runs at its owner", fed.settled)
    run.metric("migration", fed.summary)
