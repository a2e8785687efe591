"""A PBFT federation in the simulator: replicas, a ledger workload, and the checkers.

:class:`PbftCluster` mounts one :class:`consensus.pbft.replica.Replica` per node (its
durable log over the node's crash-consistent store), drives a workload of
ledger commands from the correct DCs, and checks, after every event:

- **agreement**: no two correct replicas execute different batches at one seq;
- **total order**: each correct replica executes seqs one after another (a
  state transfer moves it to the checkpoint it installed);
- **exactly-once**: a request executes at one seq only, at every correct replica;
- **validity**: a request of a correct DC executes only if that DC submitted it;
- **promises**: nothing a correct replica signs contradicts what it signed before,
  also across its crashes and restarts (:mod:`sim.hosts.pbft_promises`);
- **ledger time**: no correct replica's ledger clock runs more than the batch-time
  bound (plus the largest clock jump of the nemesis) ahead of virtual time, whatever
  a Byzantine primary stamps (:mod:`consensus.pbft.batch_time`);
- **ledger invariants**: asserted inside :class:`consensus.ledger.Ledger` itself
  (a violation raises and stops the run), and in the quiet phase every correct
  replica ends with the same ledger state digest.

Liveness (quiet phase): every request pending at a correct replica or awaited
by a correct client has executed at every correct replica, which all agree on
height and state.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import attrs

from consensus.ledger import (
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    CommitMigration,
    ImportVm,
    Ledger,
    MigrateVm,
    RegisterVm,
)
from consensus.pbft.batch_time import TIME_BOUND
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.messages import MAX_REQUEST_COMMANDS, Envelope
from consensus.pbft.replica import PbftConfig, Replica
from mesh import wire
from mesh.identity import Identity, PublicKey
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner
from sim.hosts.pbft_promises import SignedPromises
from sim.nemesis import CLOCK_JUMP_MAX
from sim.scenario import Run, ScenarioSpec
from sim.world import NotifyRecord, SimNode, World

__all__ = ["SIM_CONFIG", "PbftCluster", "identity_for"]

#: Settings for simulated runs. The 2 s BFT-SMaRt base timeout is halved, so that
#: a scenario shows several view changes within a short fault phase (virtual time
#: is free, but events are not). Checkpoints every 8 seqnos with a window of 16
#: (K and L of TOCS'02 scaled down by 16, keeping L = 2K) so that a run of a few
#: dozen commands exercises checkpoints, log truncation, watermarks and state
#: transfer, which K = 128 would only reach after thousands of events.
SIM_CONFIG = PbftConfig(
    view_timeout=1.0, status_interval=0.5, client_timeout=120.0,
    checkpoint_interval=8, window=16,
)


def identity_for(name: str) -> Identity:
    """A deterministic key per DC name (the simulator's federation file)."""
    return Identity.from_seed(hashlib.sha256(b"dwcp-sim-key/" + name.encode()).digest())


#: Replica counters summed over the correct replicas in a run's summary.
_COUNTED = (
    "invalid_signatures", "malformed", "forged_prepared_certificates", "invalid_view_changes",
    "invalid_new_views", "equivocation_proofs", "view_changes_completed", "f_plus_one_joins",
    "state_transfers", "stable_checkpoints", "restores_offloaded",
)


class PbftCluster:
    def __init__(
        self,
        run: Run,
        n: int | None = None,
        config: PbftConfig = SIM_CONFIG,
        byzantine: tuple[str, ...] = (),
    ) -> None:
        self.run = run
        self.world: World = run.world
        #: Receivers get the sent Envelope objects (World.decode_frames; the bytes are
        #: still encoded, carried and traced, tampered frames still decoded): the
        #: replica decodes and checks every signed body itself, and the envelope
        #: decode was a sixth of a run's time. The world's own decode path is tested
        #: by tests/test_pbft_sim.py (the same trace both ways).
        self.world.decode_frames = bool(run.param("decode_frames", False))
        self.names = run.names()[: n or run.nodes]
        self.keys: dict[str, PublicKey] = {m: identity_for(m).public for m in self.names}
        #: ``--param offload_restore=true``: state transfers' ledgers rebuilt off the
        #: replicas' steps (as in the node), outcomes ``offload_delay`` seconds later
        if run.param("offload_restore", False):
            config = attrs.evolve(config, offload_restore=True)
            self.world.offload_delay = float(run.param("offload_delay", 0.5))
        self.config = config
        #: DCs outside the fault bound's "correct" set: not checked, submit nothing
        self.byzantine: set[str] = set(byzantine)
        self.digest_at: dict[int, tuple[bytes, str]] = {}
        self.next_seq: dict[str, int] = {}
        self.request_seq: dict[tuple[str, int], int] = {}
        self.submitted: dict[str, set[int]] = {m: set() for m in self.names}
        #: correct DCs left out of the workload (neither submitting nor a migration's
        #: target): a scenario drives their clients itself (sim.scenarios.ledger_insider)
        self.idle: set[str] = set()
        #: the operator whose requests each DC's workload carries (nonces per DC)
        self.signers = {m: OperatorSigner("ops", prefix=m) for m in self.names}
        self.problem: str | None = None
        self.promises = SignedPromises()
        for name in self.names:
            self.world.add_node(name, self._build(name, name))
        self.world.on_notify(self._on_notify)
        self.world.on_send(self._on_send)
        run.add_checker("pbft-safety", lambda w: self.problem)
        run.liveness("every pending request executed at every correct replica", self.settled)
        run.metric("pbft", self.summary)

    @classmethod
    def standalone(cls, seed: int, n: int = 4, config: PbftConfig = SIM_CONFIG) -> PbftCluster:
        """A cluster in a world of its own, outside any registered scenario (for tests that
        script their own faults and drive ``world.run`` themselves)."""
        spec = ScenarioSpec("pbft-standalone", lambda run: None, n, 0.0, 0.0, (), "", 4)
        return cls(Run(spec, seed, n, False), config=config)

    def submit(self, name: str, command: Any) -> int | None:
        """DC ``name`` submits ``command`` now; its request id, or None if the node is down."""
        out: list[int] = []

        def go(replica: Replica, now: float) -> list[Any]:
            rid, actions = replica.submit(now, wire.encode(command))
            self.submitted[name].add(rid)
            out.append(rid)
            return actions

        self.world.invoke(name, "pbft", go, f"submit {name}")
        return out[0] if out else None

    def _build(self, node_name: str, replica_name: str) -> Callable[[SimNode], None]:
        def build(node: SimNode) -> None:
            replica = Replica(
                replica_name, identity_for(replica_name), self.keys, ReplicaLog(node.store),
                node.rng("pbft"), self.config, SIM_OPERATORS,
            )
            node.mount("pbft", replica, accepts=(Envelope,))

        return build

    def add_twin(self, of: str, node_name: str) -> None:
        """Twins (DiemBFT): a second node running replica ``of`` with the same key."""
        self.byzantine.update({of, node_name})
        self.world.add_node(node_name, self._build(node_name, of))

    def correct(self) -> list[str]:
        return [m for m in self.names if m not in self.byzantine]

    def replica(self, name: str) -> Replica | None:
        node = self.world.nodes[name]
        return node.core("pbft") if node.up and "pbft" in node.cores else None

    # ------------------------------------------------------------------ checkers

    def _on_notify(self, rec: NotifyRecord) -> None:
        if rec.node in self.byzantine or self.problem is not None:
            return
        if rec.kind == "pbft.state-transfer":
            self.next_seq[rec.node] = rec.detail["seq"] + 1
        elif rec.kind == "pbft.executed":
            self._check_executed(rec.node, rec.detail)

    def _on_send(self, node: str, peer: str, msg: object) -> None:
        if node not in self.byzantine and self.problem is None:
            self.problem = self.promises.envelope(node, msg)

    def _check_executed(self, node: str, d: dict[str, Any]) -> None:
        seq, dig = d["seq"], d["digest"]
        expect = self.next_seq.get(node, 1)
        if seq > expect:
            self.problem = f"total order: {node} executed seq {seq}, expected {expect}"
            return
        # seq < expect: a restarted replica re-executing from its durable log
        self.next_seq[node] = seq + 1
        first = self.digest_at.setdefault(seq, (dig, node))
        if first[0] != dig:
            self.problem = f"agreement: seq {seq} is {first[0].hex()[:12]} at {first[1]}, " \
                           f"{dig.hex()[:12]} at {node}"
            return
        replica = self.replica(node)
        ahead = TIME_BOUND + CLOCK_JUMP_MAX
        if replica is not None and replica.ledger.clock > self.world.now + ahead:
            self.problem = (f"ledger time: {node}'s ledger clock is {replica.ledger.clock:.3f} "
                            f"at {self.world.now:.3f}, more than {ahead:.0f} s ahead")
            return
        for key in d["requests"]:
            at = self.request_seq.setdefault(tuple(key), seq)
            if at != seq:
                self.problem = f"exactly-once: {key} executed at seq {at} and at {seq} ({node})"
                return
            client, rid = key
            if client not in self.byzantine and rid not in self.submitted.get(client, ()):
                self.problem = f"validity: {node} executed {key}, which {client} never submitted"
                return

    def settled(self, world: World) -> bool:
        reps = [self.replica(m) for m in self.correct()]
        if any(r is None for r in reps):
            return False
        live = [r for r in reps if r is not None]
        # Views may differ: a replica that moved to a higher view alone (it was cut off)
        # cannot go back (its VIEW-CHANGE promised not to), and waits there until the
        # others change view; it keeps up through state transfer meanwhile.
        if len({r.last_exec for r in live}) != 1:
            return False
        # Every request still pending at a correct replica, or still awaited by its
        # (correct, live) client, has executed. A request whose client crashed before
        # any replica saw it is lost with the client's memory; its caller saw a failure.
        for r in live:
            if r.client.outstanding:
                return False
            for client, rid in r.pending:
                if live[0].ledger.executed_result(client, rid) is None:
                    return False
        return len({r.ledger.state_digest() for r in live}) == 1

    def summary(self, world: World) -> dict[str, Any]:
        reps = {m: self.replica(m) for m in self.names}
        totals: dict[str, int] = {}
        for m in self.correct():
            r = reps[m]
            if r is not None:
                for key in _COUNTED:
                    totals[key] = totals.get(key, 0) + r.metrics.get(key, 0)
        return {
            "counted": totals,
            "executed_seqs": max(self.digest_at, default=0),
            "requests": len(self.request_seq),
            "views": {m: r.view for m, r in reps.items() if r is not None},
            "convicted": sorted({c for r in reps.values() if r is not None
                                 for c in r.evidence.proofs}),
        }

    # ------------------------------------------------------------------ workload

    def workload(self, start: float, end: float, per_node: int, rng: random.Random) -> None:
        """Each correct DC (but the idle ones) submits ``per_node`` commands at random
        times in [start, end)."""
        for name in self.correct():
            if name in self.idle:
                continue
            for t in sorted(rng.uniform(start, end) for _ in range(per_node)):
                self.world.at(t, self._submitter(name, rng.random()), f"submit {name}")

    def _submitter(self, name: str, draw: float) -> Callable[[World], None]:
        # Most submissions are one command; one in four signs several together
        # (Replica.submit_many), as a DC does with commands that are ready at once.
        count = 1 if draw < 0.75 else 2 + int(draw * 10_000) % (MAX_REQUEST_COMMANDS - 1)

        def submit(world: World) -> None:
            def go(replica: Replica, now: float) -> list[Any]:
                cmds = tuple(wire.encode(self.command(name, replica.ledger, (draw + i / 7) % 1.0,
                                                      now))
                             for i in range(count))
                rids, actions = replica.submit_many(now, cmds)
                self.submitted[name].update(rids)
                return actions

            world.invoke(name, "pbft", go, f"submit {name}")

        return submit

    def command(self, name: str, ledger: Ledger, draw: float, now: float) -> Any:
        """A plausible next command for DC ``name`` given its view of the ledger; the
        operator commands carry an operator's request signed at ``now``."""
        rng = random.Random(draw)
        mine = [v for v in sorted(ledger.vms) if ledger.vms[v].owner == name]
        incoming = sorted(m.migration_id for m in ledger.migrations.values()
                          if m.state == "begun" and m.target == name)
        outgoing = sorted(m.migration_id for m in ledger.migrations.values()
                          if m.state == "begun" and m.source == name)
        if incoming and draw < 0.4:
            # the root the source announced (a commit without one is refused, as it must be)
            mid = rng.choice(incoming)
            root = ledger.migrations[mid].announced or hashlib.sha256(b"%f" % draw).digest()
            return CommitMigration(mid, root)
        if outgoing and draw < 0.5:
            mid = rng.choice(outgoing)
            if draw < 0.45 and not ledger.migrations[mid].announced:
                return AnnounceRoot(mid, hashlib.sha256(mid.encode()).digest())
            return AbortMigration(mid)
        sign = self.signers[name]
        idle = [v for v in mine if ledger.vms[v].migration_id is None]
        if idle and draw < 0.8:
            vm = rng.choice(idle)
            target = rng.choice([m for m in self.names if m != name and m not in self.idle])
            return BeginMigration(vm, name, target, ledger.vms[vm].epoch, f"mig-{draw:.12f}",
                                  sign.authorize(
                                      MigrateVm(vm, target, name, ledger.vms[vm].epoch), now))
        vm = f"vm-{name}-{draw:.9f}"
        return RegisterVm(vm, name, sign.authorize(ImportVm(vm, name, "/sim"), now))
