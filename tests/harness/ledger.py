"""Driving a :class:`consensus.ledger.Ledger` directly, as the DCs and the operators of a
four-DC federation would: request ids per DC, operator requests signed by the
simulator's operators (:mod:`sim.hosts.operators`) at an advancing clock."""

from __future__ import annotations

from consensus.authz import Authorization
from consensus.ledger import (
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    CancelMigration,
    ChangePolicy,
    CommitMigration,
    DeleteVm,
    ImportVm,
    Ledger,
    LedgerResult,
    MigrateVm,
    RegisterVm,
    SetPolicy,
    UnregisterVm,
)
from mesh import wire
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner

DCS = ("dc-a", "dc-b", "dc-c", "dc-d")
ROOT = b"\x01" * 32


class LedgerDriver:
    """One ledger and the parties that submit to it (see the module docstring)."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.ledger = ledger if ledger is not None else Ledger(DCS, SIM_OPERATORS)
        self.rids: dict[str, int] = {}
        self.signers = {op.name: OperatorSigner(op.name, prefix=f"t-{op.name}")
                        for op in SIM_OPERATORS.operators}
        #: the operators' clock: each request is signed one second after the last
        self.clock = 1_000.0

    def auth(self, intent: object, who: str = "ops", at: float | None = None,
             nonce: str | None = None) -> Authorization:
        if at is None:
            self.clock += 1.0
            at = self.clock
        return self.signers[who].authorize(intent, at, nonce)

    def run(self, client: str, command: object, now: float | None = None) -> LedgerResult:
        rid = self.rids.get(client, 0) + 1
        self.rids[client] = rid
        raw = self.ledger.execute(client, rid, wire.encode(command), now)
        result: LedgerResult = wire.decode(raw, expect=(LedgerResult,))
        return result

    # ------------------------------------------------------------------ commands

    def register(self, vm: str, owner: str, *, client: str | None = None,
                 who: str = "ops") -> LedgerResult:
        auth = self.auth(ImportVm(vm, owner, f"/images/{vm}.img"), who)
        return self.run(client or owner, RegisterVm(vm, owner, auth))

    def begin(self, vm: str, source: str, target: str, mid: str, *, epoch: int | None = None,
              client: str | None = None, who: str = "ops", version: int = 1) -> LedgerResult:
        if epoch is None:
            epoch = self.ledger.epoch(vm) or 0
        auth = self.auth(MigrateVm(vm, target, source, epoch), who)
        return self.run(client or source,
                        BeginMigration(vm, source, target, epoch, mid, auth, version))

    def announce(self, mid: str, root: bytes = ROOT, client: str | None = None) -> LedgerResult:
        return self.run(client or self.ledger.migrations[mid].source, AnnounceRoot(mid, root))

    def commit(self, mid: str, root: bytes = ROOT, client: str | None = None) -> LedgerResult:
        return self.run(client or self.ledger.migrations[mid].target, CommitMigration(mid, root))

    def abort(self, mid: str, client: str, who: str | None = None, reason: str = "",
              cause: str = "") -> LedgerResult:
        auth = self.auth(CancelMigration(mid), who) if who else None
        return self.run(client, AbortMigration(mid, auth, reason, cause))

    def policy(self, policy: SetPolicy, client: str = "dc-c", who: str = "admin") -> LedgerResult:
        return self.run(client, ChangePolicy(self.auth(policy, who)))

    def delete(self, vm: str, client: str = "dc-c", who: str = "ops") -> LedgerResult:
        return self.run(client, UnregisterVm(vm, self.auth(DeleteVm(vm), who)))

    def migrate(self, vm: str, source: str, target: str, mid: str) -> LedgerResult:
        """A whole migration: begin, the source's root, the target's commit."""
        assert self.begin(vm, source, target, mid).ok
        assert self.announce(mid).ok
        return self.commit(mid)


#: An operator's request to move vm1 to dc2, for session tests (sessions carry it to
#: the ledger; they never check it).
AUTH = OperatorSigner("ops", prefix="t-session").authorize(MigrateVm("vm1", "dc2", "dc1", 0), 0.0)


_REGISTRAR = OperatorSigner("ops", prefix="t-register")


def register(vm: str, owner: str, at: float = 0.0) -> RegisterVm:
    """A ``RegisterVm`` of ``vm`` at ``owner`` carrying an operator's import request signed
    at ``at`` (a new request id each call), for tests that drive replicas."""
    return RegisterVm(vm, owner, _REGISTRAR.authorize(ImportVm(vm, owner, "/m"), at))
