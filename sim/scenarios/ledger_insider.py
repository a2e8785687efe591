"""``ledger-insider`` (issue 15 item 3): a DC with a valid key asks the ledger for what is
not its to ask, and every replica refuses.

Four DCs run PBFT (:mod:`sim.hosts.pbft_cluster`) under the ledger workload of three
of them, whose operators import and migrate VMs. The fourth is the *insider*: a
correct replica (it orders, prepares, commits and checkpoints like the others, and
PBFT's checkers hold it to that) whose client — signed with its own valid DC key —
submits, at random times, commands it may not make:

===================  ==================================================================
begin-not-owner      begin a migration of another DC's VM to itself, with an operator's
                     request for some other migration it saw in a batch (or one it forged)
commit-not-target    commit someone else's migration (with its announced root if any)
abort-not-party      abort a migration it is neither the source nor the target of
register-forged      register a VM with an "operator" request signed by its DC key
register-captured    register to itself a VM an operator imported at another DC
policy-forged        set the kill switch with a forged admin request
policy-captured      change the policy with an operator request for something else
delete-captured      delete a VM with an operator request for something else
cancel-forged        cancel a migration with a forged operator request
replay-captured      re-submit another DC's operator command, as it was ordered
===================  ==================================================================

The requests it "captures" are the ones it really sees: the batches its replica
ordered. Checkers, after every event: every correct replica refused each of the
insider's commands it executed; no ledger gives the insider a VM (the workload
migrates nothing to it) and the policy never changes (the workload sets none).
Liveness is PbftCluster's: every request, the insider's included, executes at every
correct replica within the quiet phase. Metric ``insider``: the attacks by kind, and
per replica how many it refused.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from consensus.authz import Authorization, authorize
from consensus.ledger import (
    AbortMigration,
    BeginMigration,
    CancelMigration,
    ChangePolicy,
    CommitMigration,
    ImportVm,
    Ledger,
    LedgerResult,
    MigrateVm,
    RegisterVm,
    SetPolicy,
    UnregisterVm,
)
from consensus.pbft.messages import Batch, Request
from consensus.pbft.replica import Replica
from mesh import wire
from sim.hosts.operators import SIM_FEDERATION
from sim.hosts.pbft_cluster import PbftCluster, identity_for
from sim.scenario import Run, scenario
from sim.world import NotifyRecord, World

__all__ = ["KINDS", "Insider"]

KINDS = ("begin-not-owner", "commit-not-target", "abort-not-party", "register-forged",
         "register-captured", "policy-forged", "policy-captured", "delete-captured",
         "cancel-forged", "replay-captured")
#: Fault phase: the pbft scenarios' (sim.scenarios.pbft_scenarios), long enough for the
#: workload's migrations to be begun while the insider strikes.
FAULTS = 10.0
#: Quiet-phase bound: the pbft scenarios' (a few doubled view changes and state transfer).
QUIET = 30.0
DEFAULT_POLICY = SetPolicy(0, (), (), False)


def captured(replica: Replica) -> list[Any]:
    """The operator commands in the batches ``replica`` holds, as ordered (any DC's)."""
    out: list[Any] = []
    batches = replica.state.batches
    for dig in sorted(batches):
        try:
            batch = wire.decode(batches[dig], expect=(Batch,))
        except wire.WireError:
            continue
        for signed in batch.requests:
            try:
                req = wire.decode(signed.body, expect=(Request,))
                commands = [wire.decode(c) for c in req.commands]
            except wire.WireError:
                continue
            out += [c for c in commands if getattr(c, "authorization", None) is not None]
    return out


class Insider:
    """The insider's attacks and the checks on every correct replica (module docstring)."""

    def __init__(self, run: Run, cluster: PbftCluster, name: str) -> None:
        self.run = run
        self.cluster = cluster
        self.name = name
        self.key = identity_for(name)  # its own DC key: all it can sign with
        self.attacks: dict[str, int] = {}
        self.refused: dict[str, int] = {m: 0 for m in cluster.names}
        self.problem: str | None = None
        self.count = 0

    # ------------------------------------------------------------------ attacks

    def forged(self, intent: object, now: float) -> Authorization:
        """An "admin" request signed with the insider's DC key."""
        self.count += 1
        return authorize(self.key, SIM_FEDERATION, "admin", intent, now,
                         f"{self.name}-forged-{self.count:06d}")

    def command(self, kind: str, ledger: Ledger, seen: list[Any], now: float,
                rng: random.Random) -> Any:
        """The ``kind`` attack as the insider can build it from what it knows."""
        self.count += 1
        ghost = f"ghost-{self.count:06d}"
        others = sorted(v for v, rec in ledger.vms.items() if rec.owner != self.name)
        begun = sorted(m for m, rec in ledger.migrations.items() if rec.state == "begun"
                       and self.name not in (rec.source, rec.target))
        auths = [c.authorization for c in seen]
        imports = [c for c in seen if isinstance(c, RegisterVm)]
        if kind == "begin-not-owner":
            vm = rng.choice(others) if others else ghost
            rec = ledger.vms.get(vm)
            begins = [c.authorization for c in seen if isinstance(c, BeginMigration)]
            auth = rng.choice(begins) if begins else self.forged(
                MigrateVm(vm, self.name, rec.owner if rec else self.name, rec.epoch if rec else 0),
                now)
            return BeginMigration(vm, rec.owner if rec else self.name, self.name,
                                  rec.epoch if rec else 0, f"steal-{self.count:06d}", auth)
        if kind == "commit-not-target":
            mid = rng.choice(begun) if begun else ghost
            mig = ledger.migrations.get(mid)
            root = mig.announced if mig and mig.announced else hashlib.sha256(
                mid.encode()).digest()
            return CommitMigration(mid, root)
        if kind == "abort-not-party":
            return AbortMigration(rng.choice(begun) if begun else ghost)
        if kind == "register-forged" or (kind == "register-captured" and not imports):
            vm = f"evil-{self.count:06d}"
            return RegisterVm(vm, self.name, self.forged(ImportVm(vm, self.name, "/x"), now))
        if kind == "register-captured":
            taken = rng.choice(imports)
            return RegisterVm(taken.vm, self.name, taken.authorization)
        if kind == "policy-forged" or (kind == "policy-captured" and not auths):
            return ChangePolicy(self.forged(SetPolicy(100, (), (), True), now))
        if kind == "policy-captured":
            return ChangePolicy(rng.choice(auths))
        if kind == "delete-captured":
            vm = rng.choice(others) if others else ghost
            auth = rng.choice(auths) if auths else self.forged(ImportVm(vm, self.name, "/x"),
                                                               now)
            return UnregisterVm(vm, auth)
        if kind == "cancel-forged":
            mid = rng.choice(begun) if begun else ghost
            return AbortMigration(mid, self.forged(CancelMigration(mid), now))
        mine = [c for c in seen if isinstance(c, (RegisterVm, BeginMigration))]
        if mine:
            return rng.choice(mine)  # replay-captured: verbatim, as another DC ordered it
        return AbortMigration(ghost)

    def strike(self, index: int, at: float, kind: str) -> None:
        rng = self.run.world.rng(f"insider/{index}")

        def go(world: World) -> None:
            def submit(replica: Replica, now: float) -> list[Any]:
                cmd = self.command(kind, replica.ledger, captured(replica), now, rng)
                rid, actions = replica.submit(now, wire.encode(cmd))
                self.cluster.submitted[self.name].add(rid)
                self.attacks[kind] = self.attacks.get(kind, 0) + 1
                return actions

            world.invoke(self.name, "pbft", submit, f"insider {kind}")

        self.run.world.at(at, go, f"insider {kind}")

    # ------------------------------------------------------------------ checks

    def on_notify(self, rec: NotifyRecord) -> None:
        if rec.kind != "pbft.executed" or rec.node not in self.cluster.correct():
            return
        replica = self.cluster.replica(rec.node)
        if replica is None:
            return
        for client, rid in rec.detail["requests"]:
            if client != self.name:
                continue
            raw = replica.ledger.executed_result(client, rid)
            result = wire.decode(raw, expect=(LedgerResult,)) if raw is not None else None
            if result is None or result.ok:
                self.fail(f"{rec.node} executed the insider's request {rid} and took it")
            else:
                self.refused[rec.node] += 1
        self.check_state(rec.node, replica.ledger)

    def check_state(self, node: str, ledger: Ledger) -> None:
        owned = sorted(v for v, r in ledger.vms.items() if r.owner == self.name)
        if owned:
            self.fail(f"{node}'s ledger gives the insider {self.name} {owned}")
        if ledger.policy != DEFAULT_POLICY:
            self.fail(f"{node}'s ledger has policy {ledger.policy}, set by no admin")

    def fail(self, message: str) -> None:
        if self.problem is None:
            self.problem = message

    def summary(self, world: World) -> dict[str, Any]:
        return {"insider": self.name, "attacks": dict(sorted(self.attacks.items())),
                "refused_by_replica": dict(sorted(self.refused.items()))}


@scenario("ledger-insider", nodes=4, faults_until=FAULTS, quiet=QUIET, min_nodes=4,
          description="a DC with a valid key submits ledger commands it may not: all refused")
def ledger_insider(run: Run) -> None:
    rng = run.rng
    cluster = PbftCluster(run)
    name = rng.choice(cluster.names)
    cluster.idle.add(name)
    cluster.workload(0.5, 0.8 * run.faults_until, 6, rng)
    insider = Insider(run, cluster, name)
    for i in range(int(run.param("attacks", 20))):
        insider.strike(i, rng.uniform(1.0, 0.9 * run.faults_until), rng.choice(KINDS))
    run.world.on_notify(insider.on_notify)
    run.add_checker("insider-refused", lambda w: insider.problem)
    run.metric("insider", insider.summary)
