"""The replicated ledger: who owns each VM, migrations, and the rollout policy.

A deterministic state machine. PBFT orders the commands; every replica applies
them in the same order through :meth:`Ledger.execute` and so holds the same
state, summarised by :meth:`Ledger.state_digest` in checkpoints.

Commands (wire messages, submitted by a DC and signed by it):

- ``RegisterVm(vm, owner)``: a new VM owned by ``owner`` at epoch 0. Only the
  owner may register it.
- ``BeginMigration(vm, source, target, epoch, migration_id)``: the source must
  own the VM at exactly ``epoch`` and no other migration may be in progress;
  submitted by the source or the target.
- ``CommitMigration(migration_id, root)``: only from BEGUN with that id; the
  target becomes the owner and the epoch grows by one. Only the target, which
  verified the tree root, commits.
- ``AbortMigration(migration_id)``: only from BEGUN; ownership stays at the
  source (it never left). Source or target.
- ``SetPolicy(v3_percent, target_dcs, target_vms, kill_switch)``: any member.

A command that breaks a rule is *rejected*: the state does not change and the
result says why. The invariants (one owner per VM, epochs only grow, commit
only from begun with a matching id) are checked after every command by
:meth:`check_invariants`; a violation raises :class:`LedgerInvariantError`,
which is a bug, never a user error.

Exactly-once: the ledger remembers, per client, the results of its last
``CLIENT_WINDOW`` request ids; a duplicate returns the remembered result
without executing again, and an id older than the window is refused.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

from consensus.ledger_encoding import SnapshotEncoder
from mesh import wire
from mesh.wire import U64, Bool, Bytes, ListOf, Optional, Struct, Text, field

__all__ = [
    "CLIENT_WINDOW",
    "LedgerInvariantError",
    "RegisterVm",
    "BeginMigration",
    "CommitMigration",
    "AbortMigration",
    "SetPolicy",
    "LedgerResult",
    "Ledger",
    "COMMAND_TYPES",
    "v3_allowed",
]

#: Request ids remembered per client for exactly-once execution. It bounds the
#: requests one client may have outstanding (PBFT keeps only the last reply per
#: client, OSDI'99 §4.1, i.e. a window of one; a node pipelines, so we keep
#: more): 1024 covers the ~150 in flight at 3,000 commits/s and 50 ms latency.
CLIENT_WINDOW = 1024
_NAME = Text(64)
_VM = Text(128)
_ID = Text(128)


class LedgerInvariantError(AssertionError):
    """The ledger reached a state its rules forbid: a bug, reported loudly."""


@wire.message("ledger.register-vm")
class RegisterVm:
    vm: str = field(_VM)
    owner: str = field(_NAME)


@wire.message("ledger.begin-migration")
class BeginMigration:
    vm: str = field(_VM)
    source: str = field(_NAME)
    target: str = field(_NAME)
    epoch: int = field(U64())
    migration_id: str = field(_ID)


@wire.message("ledger.commit-migration")
class CommitMigration:
    migration_id: str = field(_ID)
    root: bytes = field(Bytes(64))


@wire.message("ledger.abort-migration")
class AbortMigration:
    migration_id: str = field(_ID)


@wire.message("ledger.set-policy")
class SetPolicy:
    v3_percent: int = field(U64(100))
    target_dcs: tuple[str, ...] = field(ListOf(_NAME, 64))
    target_vms: tuple[str, ...] = field(ListOf(_VM, 4096))
    kill_switch: bool = field(Bool())


COMMAND_TYPES: tuple[type, ...] = (
    RegisterVm,
    BeginMigration,
    CommitMigration,
    AbortMigration,
    SetPolicy,
)


@wire.message("ledger.result")
class LedgerResult:
    ok: bool = field(Bool())
    error: str = field(Text(256), default="")
    epoch: int = field(U64(), default=0)


# --------------------------------------------------------------------------- state


@wire.struct_type
class VmRecord:
    vm: str = field(_VM)
    owner: str = field(_NAME)
    epoch: int = field(U64())
    migration_id: str | None = field(Optional(_ID))


@wire.struct_type
class MigrationRecord:
    migration_id: str = field(_ID)
    vm: str = field(_VM)
    source: str = field(_NAME)
    target: str = field(_NAME)
    epoch: int = field(U64())
    state: str = field(Text(16))  # "begun" | "committed" | "aborted"
    root: bytes = field(Bytes(64))


@wire.struct_type
class ClientResult:
    request_id: int = field(U64())
    result: bytes = field(Bytes(4096))


@wire.struct_type
class ClientRecord:
    """Ids below ``floor`` are expired; ``results`` holds the executed ids at or above it."""

    client: str = field(_NAME)
    floor: int = field(U64())
    results: tuple[ClientResult, ...] = field(ListOf(Struct(ClientResult), CLIENT_WINDOW))


#: The item limits of LedgerSnapshot's lists (vms, migrations, clients).
_SNAPSHOT_LIMITS = (1_000_000, 1_000_000, 64)


@wire.message("ledger.snapshot", max_size=wire.ABSOLUTE_MAX_SIZE)
class LedgerSnapshot:
    vms: tuple[VmRecord, ...] = field(ListOf(Struct(VmRecord), _SNAPSHOT_LIMITS[0]))
    migrations: tuple[MigrationRecord, ...] = field(
        ListOf(Struct(MigrationRecord), _SNAPSHOT_LIMITS[1])
    )
    policy: SetPolicy = field(Struct(SetPolicy))
    clients: tuple[ClientRecord, ...] = field(ListOf(Struct(ClientRecord), _SNAPSHOT_LIMITS[2]))


def v3_allowed(policy: SetPolicy, vm: str, source: str, target: str) -> bool:
    """The rollout decision: never under the kill switch; always for targeted VMs or
    DCs; otherwise a stable hash of the VM id modulo 100 below the percentage."""
    if policy.kill_switch:
        return False
    if vm in policy.target_vms or source in policy.target_dcs or target in policy.target_dcs:
        return True
    bucket = int.from_bytes(hashlib.sha256(vm.encode()).digest()[:8], "big") % 100
    return bucket < policy.v3_percent


def _finished(mig: MigrationRecord, state: str, root: bytes) -> MigrationRecord:
    return MigrationRecord(mig.migration_id, mig.vm, mig.source, mig.target, mig.epoch, state, root)


#: Encoded results by value: most commands answer the same few results (a
#: register is "ok, epoch 0"), so the encoding is looked up, not redone.
_RESULT_BYTES: dict[LedgerResult, bytes] = {}
_RESULT_MEMO = 1024


def _encoded(result: LedgerResult) -> bytes:
    data = _RESULT_BYTES.get(result)
    if data is None:
        data = wire.encode(result)
        if len(_RESULT_BYTES) >= _RESULT_MEMO:
            del _RESULT_BYTES[next(iter(_RESULT_BYTES))]
        _RESULT_BYTES[result] = data
    return data


_REJECT_DUPLICATE_EXPIRED = wire.encode(
    LedgerResult(False, "request id is older than the client's exactly-once window")
)


class Ledger:
    """The deterministic ledger state machine (see the module docstring)."""

    def __init__(self, members: Iterable[str]) -> None:
        self.members = tuple(sorted(members))
        self.vms: dict[str, VmRecord] = {}
        self.migrations: dict[str, MigrationRecord] = {}
        self.policy = SetPolicy(0, (), (), False)
        # client -> (floor, {request_id: result}); ids below floor are expired
        self._clients: dict[str, tuple[int, dict[int, bytes]]] = {}
        self._epoch_seen: dict[str, int] = {}
        # per client, a min-heap of its remembered request ids (evicted smallest first)
        self._ids: dict[str, list[int]] = {}
        self._touched: list[str] = []
        self._touched_migrations: list[str] = []
        self._encoder = SnapshotEncoder(LedgerSnapshot, _SNAPSHOT_LIMITS)

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

    # ------------------------------------------------------------------ execution

    def execute(self, client: str, request_id: int, command: bytes) -> bytes:
        """Apply one ordered request exactly once and return its encoded result."""
        known = self.executed_result(client, request_id)
        if known is not None:
            return known
        self._touched, self._touched_migrations = [], []
        result = _encoded(self._apply(client, command))
        floor, results = self._clients.setdefault(client, (0, {}))
        results[request_id] = result
        ids = self._ids.setdefault(client, [])
        heapq.heappush(ids, request_id)
        changed = [request_id]
        while len(results) > CLIENT_WINDOW:
            oldest = heapq.heappop(ids)
            del results[oldest]
            changed.append(oldest)
            floor = max(floor, oldest + 1)
        self._clients[client] = (floor, results)
        self.check_invariants(self._touched)
        # every change goes to the snapshot encoder as it happens (see snapshot())
        self._encoder.touched(self.vms, self._touched, self.migrations, self._touched_migrations)
        self._encoder.touched_results(client, results, changed)
        return result

    def _apply(self, client: str, command: bytes) -> LedgerResult:
        try:
            cmd = wire.decode(command, expect=COMMAND_TYPES)
        except wire.WireError as exc:
            return LedgerResult(False, f"malformed command: {exc}"[:256])
        if isinstance(cmd, RegisterVm):
            return self._register(client, cmd)
        if isinstance(cmd, BeginMigration):
            return self._begin(client, cmd)
        if isinstance(cmd, CommitMigration):
            return self._finish(client, cmd.migration_id, cmd.root, commit=True)
        if isinstance(cmd, AbortMigration):
            return self._finish(client, cmd.migration_id, b"", commit=False)
        return self._set_policy(client, cmd)

    def _register(self, client: str, cmd: RegisterVm) -> LedgerResult:
        if cmd.owner not in self.members:
            return LedgerResult(False, f"owner {cmd.owner!r} is not a member")
        if client != cmd.owner:
            return LedgerResult(False, "only the owner registers a VM")
        if cmd.vm in self.vms:
            return LedgerResult(False, f"VM {cmd.vm!r} is already registered")
        self.vms[cmd.vm] = VmRecord(cmd.vm, cmd.owner, 0, None)
        self._touched.append(cmd.vm)
        return LedgerResult(True, epoch=0)

    def _begin(self, client: str, cmd: BeginMigration) -> LedgerResult:
        rec = self.vms.get(cmd.vm)
        if rec is None:
            return LedgerResult(False, f"VM {cmd.vm!r} is not registered")
        if client not in (cmd.source, cmd.target):
            return LedgerResult(False, "only the source or the target begins a migration")
        if cmd.target not in self.members or cmd.target == cmd.source:
            return LedgerResult(False, f"target {cmd.target!r} is not another member")
        if rec.owner != cmd.source:
            return LedgerResult(False, f"VM {cmd.vm!r} is owned by {rec.owner!r}", rec.epoch)
        if rec.epoch != cmd.epoch:
            return LedgerResult(False, f"stale epoch {cmd.epoch}, VM is at {rec.epoch}", rec.epoch)
        if rec.migration_id is not None:
            begun = self.migrations[rec.migration_id]
            if (begun.migration_id, begun.source, begun.target, begun.epoch) == (
                cmd.migration_id, cmd.source, cmd.target, cmd.epoch
            ):
                # The same begin again (a session restored after a crash resubmits it
                # as a new request): idempotent by migration id, changes nothing.
                return LedgerResult(True, epoch=rec.epoch)
            return LedgerResult(False, f"migration {rec.migration_id!r} is in progress", rec.epoch)
        if cmd.migration_id in self.migrations:
            return LedgerResult(False, f"migration id {cmd.migration_id!r} was used before")
        self.migrations[cmd.migration_id] = MigrationRecord(
            cmd.migration_id, cmd.vm, cmd.source, cmd.target, cmd.epoch, "begun", b""
        )
        self.vms[cmd.vm] = VmRecord(rec.vm, rec.owner, rec.epoch, cmd.migration_id)
        self._touched.append(cmd.vm)
        self._touched_migrations.append(cmd.migration_id)
        return LedgerResult(True, epoch=rec.epoch)

    def _finish(self, client: str, mid: str, root: bytes, *, commit: bool) -> LedgerResult:
        mig = self.migrations.get(mid)
        if mig is None:
            return LedgerResult(False, f"no migration {mid!r}")
        if mig.state != "begun":
            return LedgerResult(False, f"migration {mid!r} is already {mig.state}")
        allowed = (mig.target,) if commit else (mig.source, mig.target)
        if client not in allowed:
            return LedgerResult(False, f"{client!r} may not finish migration {mid!r}")
        rec = self.vms[mig.vm]
        if rec.migration_id != mid:
            raise LedgerInvariantError(f"VM {mig.vm!r} does not point at begun migration {mid!r}")
        if commit:
            if not root:
                return LedgerResult(False, "a commit carries the verified tree root")
            self.vms[mig.vm] = VmRecord(mig.vm, mig.target, rec.epoch + 1, None)
            self.migrations[mid] = _finished(mig, "committed", root)
        else:
            self.vms[mig.vm] = VmRecord(rec.vm, rec.owner, rec.epoch, None)
            self.migrations[mid] = _finished(mig, "aborted", b"")
        self._touched.append(mig.vm)
        self._touched_migrations.append(mid)
        return LedgerResult(True, epoch=self.vms[mig.vm].epoch)

    def _set_policy(self, client: str, cmd: SetPolicy) -> LedgerResult:
        if client not in self.members:
            return LedgerResult(False, f"{client!r} is not a member")
        self.policy = SetPolicy(
            cmd.v3_percent, tuple(sorted(set(cmd.target_dcs))), tuple(sorted(set(cmd.target_vms))),
            cmd.kill_switch,
        )
        return LedgerResult(True)

    # ------------------------------------------------------------------ invariants

    def check_invariants(self, touched: Iterable[str] | None = None) -> None:
        """One owner per VM (a member), epochs only grow, begun migrations match.

        With ``touched`` (the VMs the last command changed) only those are checked:
        a command changes nothing else, and a full check per command would make
        execution quadratic in the number of VMs."""
        if touched is not None:
            for vm in touched:
                self._check_vm(vm, self.vms[vm])
            for mid in self._touched_migrations:
                self._check_migration(self.migrations[mid])
            return
        for vm, rec in self.vms.items():
            self._check_vm(vm, rec)
        for mig in self.migrations.values():
            self._check_migration(mig)

    def _check_migration(self, mig: MigrationRecord) -> None:
        if mig.state == "begun" and self.vms[mig.vm].migration_id != mig.migration_id:
            raise LedgerInvariantError(f"begun migration {mig.migration_id!r} is orphaned")

    def _check_vm(self, vm: str, rec: VmRecord) -> None:
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
                                    touched=True)

    def snapshot_message(self) -> LedgerSnapshot:
        """The whole state as one wire message (what :meth:`snapshot` encodes)."""
        clients = tuple(
            ClientRecord(c, floor, tuple(ClientResult(rid, res[rid]) for rid in sorted(res)))
            for c, (floor, res) in sorted(self._clients.items())
        )
        snap = LedgerSnapshot(
            tuple(self.vms[v] for v in sorted(self.vms)),
            tuple(self.migrations[m] for m in sorted(self.migrations)),
            self.policy,
            clients,
        )
        return snap

    def state_digest(self) -> bytes:
        return hashlib.sha256(self.snapshot()).digest()

    @classmethod
    def restore(cls, members: Iterable[str], data: bytes) -> Ledger:
        """Rebuild from :meth:`snapshot` bytes; raises ``wire.WireError`` or
        :class:`LedgerInvariantError` for bytes that are not a valid state."""
        snap = wire.decode(data, expect=(LedgerSnapshot,))
        ledger = cls(members)
        ledger.vms = {r.vm: r for r in snap.vms}
        ledger.migrations = {m.migration_id: m for m in snap.migrations}
        ledger.policy = snap.policy
        for rec in snap.clients:
            ledger._clients[rec.client] = (rec.floor, {r.request_id: r.result for r in rec.results})
            ledger._ids[rec.client] = sorted(r.request_id for r in rec.results)
        ledger.check_invariants()
        return ledger
