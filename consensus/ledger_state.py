"""The ledger's state: what it holds, its queries, its invariants, its snapshot.

:class:`LedgerState` is everything of the ledger except the rules that change it
(:class:`consensus.ledger.Ledger` adds execution). The snapshot is canonical
CBOR of the whole state (sorted, so replicas agree byte for byte), assembled
from cached record encodings (:mod:`consensus.ledger_encoding`); a restored
state encodes to the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import attrs

from consensus.authz import OperatorTable
from consensus.ledger_commands import (
    SNAPSHOT_LIMITS,
    ClientRecord,
    ClientResult,
    DeletedVm,
    LedgerResult,
    LedgerSnapshot,
    MigrationRecord,
    SetPolicy,
    VmRecord,
)
from consensus.ledger_encoding import SnapshotEncoder
from consensus.operator_requests import RequestBook
from consensus.snapshot_chunks import MAX_SNAPSHOT, snapshot_digest
from mesh import wire

__all__ = ["LedgerState", "LedgerInvariantError", "RequestStatus"]

_S = TypeVar("_S", bound="LedgerState")

_REJECT_DUPLICATE_EXPIRED = wire.encode(
    LedgerResult(False, "request id is older than the client's exactly-once window")
)


class LedgerInvariantError(AssertionError):
    """The ledger reached a state its rules forbid: a bug, reported loudly."""


@attrs.frozen
class RequestStatus:
    """What the ledger knows of an operator request: ``state`` is ``committed``,
    ``refused`` or ``unknown`` (never executed here, or forgotten after RETENTION)."""

    state: str
    command: str = ""
    subject: str = ""
    error: str = ""
    created: float = 0.0
    epoch: int = 0


class LedgerState:
    """VMs, migrations, policy, ledger time, operator requests, deleted VMs, and the
    per-client results of exactly-once execution."""

    def __init__(self, members: Iterable[str], operators: OperatorTable | None = None) -> None:
        self.members = tuple(sorted(members))
        #: who may sign operator requests; none: every operator command is refused
        self.operators = operators if operators is not None else OperatorTable("")
        self.vms: dict[str, VmRecord] = {}
        self.migrations: dict[str, MigrationRecord] = {}
        self.policy = SetPolicy(0, (), (), False)
        #: ledger time (consensus.ledger's module docstring); never goes back
        self.clock = 0.0
        self.requests = RequestBook()
        #: deleted VM -> its last epoch
        self.deleted: dict[str, int] = {}
        #: refusals by kind ("authorization": who may ask; "rule": the state forbids it),
        #: counted as this replica executes (an observation, not part of the state)
        self.refusals: dict[str, int] = {}
        # client -> (floor, {request_id: result}); ids below floor are expired
        self._clients: dict[str, tuple[int, dict[int, bytes]]] = {}
        self._epoch_seen: dict[str, int] = {}
        # per client, a min-heap of its remembered request ids (evicted smallest first)
        self._ids: dict[str, list[int]] = {}
        self._touched_migrations: list[str] = []
        self._encoder = SnapshotEncoder(LedgerSnapshot, SNAPSHOT_LIMITS, MAX_SNAPSHOT)

    # ------------------------------------------------------------------ queries

    def owner(self, vm: str) -> str | None:
        rec = self.vms.get(vm)
        return rec.owner if rec else None

    def epoch(self, vm: str) -> int | None:
        rec = self.vms.get(vm)
        return rec.epoch if rec else None

    def executed_result(self, client: str, request_id: int) -> bytes | None:
        entry = self._clients.get(client)
        if entry is None:
            return None
        floor, results = entry
        if request_id < floor:
            return _REJECT_DUPLICATE_EXPIRED
        return results.get(request_id)

    def request_status(self, operator: str, nonce: str) -> RequestStatus:
        """The outcome of operator ``operator``'s request ``nonce`` (its request id)."""
        rec = self.requests.get(operator, nonce)
        if rec is None:
            return RequestStatus("unknown")
        res = wire.decode(rec.result, expect=(LedgerResult,))
        return RequestStatus("committed" if res.ok else "refused", rec.command, rec.subject,
                             res.error, rec.created, res.epoch)

    # ------------------------------------------------------------------ invariants

    def check_invariants(self, touched: Iterable[str] | None = None) -> None:
        """One owner per VM (a member), epochs only grow, begun migrations match, a VM is
        never both registered and deleted.

        With ``touched`` (the VMs the last command changed) only those are checked:
        a command changes nothing else, and a full check per command would make
        execution quadratic in the number of VMs."""
        if touched is not None:
            for vm in touched:
                self._check_vm(vm)
            for mid in self._touched_migrations:
                self._check_migration(self.migrations[mid])
            return
        for vm in list(self.vms) + list(self.deleted):
            self._check_vm(vm)
        for mig in self.migrations.values():
            self._check_migration(mig)

    def _check_migration(self, mig: MigrationRecord) -> None:
        if mig.state == "begun":
            rec = self.vms.get(mig.vm)
            if rec is None or rec.migration_id != mig.migration_id:
                raise LedgerInvariantError(f"begun migration {mig.migration_id!r} is orphaned")

    def _check_vm(self, vm: str) -> None:
        rec = self.vms.get(vm)
        if rec is None:
            if vm not in self.deleted:
                raise LedgerInvariantError(f"VM {vm!r} vanished without a deletion")
            return
        if vm in self.deleted:
            raise LedgerInvariantError(f"VM {vm!r} is both registered and deleted")
        if rec.owner not in self.members:
            raise LedgerInvariantError(f"VM {vm!r} owned by non-member {rec.owner!r}")
        if rec.epoch < self._epoch_seen.get(vm, 0):
            raise LedgerInvariantError(f"epoch of VM {vm!r} went backwards")
        self._epoch_seen[vm] = rec.epoch
        if rec.migration_id is not None:
            mig = self.migrations.get(rec.migration_id)
            if mig is None or mig.state != "begun" or mig.vm != vm or mig.source != rec.owner:
                raise LedgerInvariantError(f"VM {vm!r} points at a migration not begun by it")

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> bytes:
        """The canonical bytes of the whole state (sorted, so replicas agree byte for byte):
        ``wire.encode`` of :meth:`snapshot_message`, from cached record encodings."""
        return self._encoder.encode(self.vms, self.migrations, self.policy, self._clients,
                                    self.clock, self.requests.records, self.deleted,
                                    touched=True)

    def snapshot_message(self) -> LedgerSnapshot:
        """The whole state as one wire message (what :meth:`snapshot` encodes)."""
        clients = tuple(
            ClientRecord(c, floor, tuple(ClientResult(rid, res[rid]) for rid in sorted(res)))
            for c, (floor, res) in sorted(self._clients.items())
        )
        records = self.requests.records
        return LedgerSnapshot(
            tuple(self.vms[v] for v in sorted(self.vms)),
            tuple(self.migrations[m] for m in sorted(self.migrations)),
            self.policy,
            clients,
            self.clock,
            tuple(records[k] for k in sorted(records)),
            tuple(DeletedVm(v, self.deleted[v]) for v in sorted(self.deleted)),
        )

    def state_digest(self) -> bytes:
        """What replicas sign in CHECKPOINTs: ``sha256`` of a snapshot of one chunk, the
        digest of its chunks' manifest above (:mod:`consensus.snapshot_chunks`)."""
        return snapshot_digest(self.snapshot())

    @classmethod
    def restore(cls: type[_S], members: Iterable[str], data: bytes,
                operators: OperatorTable | None = None) -> _S:
        """Rebuild from :meth:`snapshot` bytes; raises ``wire.WireError`` or
        :class:`LedgerInvariantError` for bytes that are not a valid state."""
        snap = wire.decode_large(data, LedgerSnapshot, MAX_SNAPSHOT)
        ledger = cls(members, operators)
        ledger.vms = {r.vm: r for r in snap.vms}
        ledger.migrations = {m.migration_id: m for m in snap.migrations}
        ledger.policy = snap.policy
        ledger.clock = snap.clock
        ledger.requests = RequestBook(snap.requests)
        ledger.deleted = {d.vm: d.epoch for d in snap.deleted}
        for rec in snap.clients:
            ledger._clients[rec.client] = (rec.floor, {r.request_id: r.result for r in rec.results})
            ledger._ids[rec.client] = sorted(r.request_id for r in rec.results)
        sizes = (len(ledger.vms), len(ledger.migrations), len(ledger._clients),
                 len(ledger.requests), len(ledger.deleted))
        if sizes != (len(snap.vms), len(snap.migrations), len(snap.clients), len(snap.requests),
                     len(snap.deleted)):
            raise LedgerInvariantError("the snapshot holds a record twice")
        ledger.check_invariants()
        return ledger
