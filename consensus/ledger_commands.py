"""The ledger's vocabulary on the wire: commands, operator intents, results, records.

Two kinds of command reach :meth:`consensus.ledger.Ledger.execute`, both inside a
DC's signed PBFT request:

- **operator commands** carry an operator's signed request
  (:class:`consensus.authz.Authorization`) whose body is an *intent* below — what
  the operator asked for, in the operator's words: :class:`RegisterVm` (intent
  :class:`ImportVm`), :class:`BeginMigration` (:class:`MigrateVm`),
  :class:`AbortMigration` with an authorization (:class:`CancelMigration`),
  :class:`ChangePolicy` (:class:`SetPolicy`) and :class:`UnregisterVm`
  (:class:`DeleteVm`);
- **DC statements**, each of which only one party of a migration may make:
  :class:`AnnounceRoot` (the source: the root of its fenced images),
  :class:`CommitMigration` (the target: it verified that root), and
  :class:`AbortMigration` without an authorization (the source; the target
  once the migration's deadline passed).

The intents are also the bodies the API and the CLI sign (federation.api.auth):
one message, checked at the door and again by every replica.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from consensus.authz import Authorization
from mesh import wire
from mesh.wire import U64, Bool, Bytes, Float, ListOf, Optional, Struct, Text, field

__all__ = [
    "RegisterVm", "BeginMigration", "AnnounceRoot", "CommitMigration", "AbortMigration",
    "ChangePolicy", "UnregisterVm", "COMMAND_TYPES",
    "ImportVm", "MigrateVm", "CancelMigration", "DeleteVm", "SetPolicy", "INTENT_TYPES",
    "LedgerResult", "VmRecord", "MigrationRecord", "ClientResult", "ClientRecord",
    "RequestRecord", "DeletedVm", "LedgerSnapshot", "SNAPSHOT_LIMITS", "MAX_REMEMBERED",
    "CLIENT_WINDOW", "v3_allowed", "ABORT_CAUSES", "recorded_policy", "rollout_after_end",
]

_NAME = Text(64)
_VM = Text(128)
_ID = Text(128)
_ROOT = Bytes(64)
_AUTH = Struct(Authorization)
_PATH = Text(1024)

#: Request ids remembered per client for exactly-once execution. It bounds the
#: requests one client may have outstanding (PBFT keeps only the last reply per
#: client, OSDI'99 §4.1, i.e. a window of one; a node pipelines, so we keep
#: more): 1024 covers the ~150 in flight at 3,000 commits/s and 50 ms latency.
CLIENT_WINDOW = 1024
#: Operator requests the ledger remembers at most (for exactly-once and the outcome
#: query by request id). 16,384 records of ~250 bytes keep the snapshot's share near
#: 4 MiB, half a frame (mesh.wire.ABSOLUTE_MAX_SIZE); it is 54 requests a second
#: sustained over the freshness window, far above what people and their scripts send.
MAX_REMEMBERED = 16_384

# --------------------------------------------------------------------------- intents


@wire.message("operator.import-vm")
class ImportVm:
    """Import the images at these paths (on ``dc``'s machine) as VM ``vm``, owned by
    ``dc``."""

    vm: str = field(_VM)
    dc: str = field(_NAME)
    memory: str = field(_PATH)
    disks: tuple[str, ...] = field(ListOf(_PATH, 16), default=())


@wire.message("operator.migrate-vm")
class MigrateVm:
    """Move ``vm`` from ``source``, which owns it at ``epoch``, to ``target``. Binding the
    source and the epoch means the request moves the VM the operator saw, once: after the
    VM moved on (a higher epoch), or from another DC, it is refused."""

    vm: str = field(_VM)
    target: str = field(_NAME)
    source: str = field(_NAME)
    epoch: int = field(U64())


@wire.message("operator.cancel-migration")
class CancelMigration:
    migration_id: str = field(_ID)


@wire.message("operator.delete-vm")
class DeleteVm:
    vm: str = field(_VM)


@wire.message("ledger.set-policy")
class SetPolicy:
    """The rollout policy: both the state the ledger holds and the admin's intent.

    The admin names who gets v3 (``v3_percent``, ``target_dcs``, ``target_regions``,
    ``target_vms``), who never does (``excluded_dcs``: node-level exclusion, above every
    target; ``kill_switch``: nobody), and when the ledger rolls back to v1 on its own
    (``max_abort_percent`` of the v3 migrations that ended since this policy was recorded,
    judged once ``min_ended`` of them ended; ``max_verify_failures`` of them failing
    verification; 0 switches a rule off). The last four fields are the ledger's own
    bookkeeping (:func:`rollout_after_end`): what an admin puts there is ignored."""

    v3_percent: int = field(U64(100))
    target_dcs: tuple[str, ...] = field(ListOf(_NAME, 64))
    target_vms: tuple[str, ...] = field(ListOf(_VM, 4096))
    kill_switch: bool = field(Bool())
    target_regions: tuple[str, ...] = field(ListOf(_NAME, 64), default=())
    excluded_dcs: tuple[str, ...] = field(ListOf(_NAME, 64), default=())
    max_abort_percent: int = field(U64(100), default=0)
    min_ended: int = field(U64(1_000_000), default=10)
    max_verify_failures: int = field(U64(1_000_000), default=0)
    #: v3 migrations ended (committed or aborted) since the policy was recorded
    v3_ended: int = field(U64(), default=0)
    #: of those, aborted for a cause other than an operator's cancel
    v3_aborted: int = field(U64(), default=0)
    #: of those, aborted because the copy failed verification
    v3_verify_failures: int = field(U64(), default=0)
    #: why the ledger rolled back to v1 (its kill switch is then on); "" while it has not
    rolled_back: str = field(Text(256), default="")


INTENT_TYPES: tuple[type, ...] = (ImportVm, MigrateVm, CancelMigration, DeleteVm, SetPolicy)

# --------------------------------------------------------------------------- commands


@wire.message("ledger.register-vm")
class RegisterVm:
    """Submitted by ``owner``, on an operator's :class:`ImportVm` naming it."""

    vm: str = field(_VM)
    owner: str = field(_NAME)
    authorization: Authorization = field(_AUTH)


@wire.message("ledger.begin-migration")
class BeginMigration:
    """Submitted by ``source``, the owner at ``epoch``, on an operator's :class:`MigrateVm`."""

    vm: str = field(_VM)
    source: str = field(_NAME)
    target: str = field(_NAME)
    epoch: int = field(U64())
    migration_id: str = field(_ID)
    authorization: Authorization = field(_AUTH)
    #: the transfer version the source chose (federation.migration.rollout): the source's
    #: statement, which the rollout's automatic rollback counts by
    version: int = field(U64(255), default=1)


@wire.message("ledger.announce-root")
class AnnounceRoot:
    """The source's statement: the tree root of its images as fenced."""

    migration_id: str = field(_ID)
    root: bytes = field(_ROOT)


@wire.message("ledger.commit-migration")
class CommitMigration:
    """The target's statement: it verified that what it holds has ``root``, which must
    be the root the source announced."""

    migration_id: str = field(_ID)
    root: bytes = field(_ROOT)


@wire.message("ledger.abort-migration")
class AbortMigration:
    """By the source; by any DC on an operator's :class:`CancelMigration`; by the
    target once the migration's deadline has passed in ledger time."""

    migration_id: str = field(_ID)
    authorization: Authorization | None = field(Optional(_AUTH), default=None)
    #: why, in the deciding DC's words (what `dwcp status` shows at every DC)
    reason: str = field(Text(256), default="")
    #: the reason's kind, one of ABORT_CAUSES (the rollout's rollback counts by it)
    cause: str = field(Text(32), default="")


@wire.message("ledger.change-policy")
class ChangePolicy:
    """Any DC, on an admin's :class:`SetPolicy`."""

    authorization: Authorization = field(_AUTH)


@wire.message("ledger.unregister-vm")
class UnregisterVm:
    """Any DC, on an operator's :class:`DeleteVm`; only with no migration in flight."""

    vm: str = field(_VM)
    authorization: Authorization = field(_AUTH)


COMMAND_TYPES: tuple[type, ...] = (
    RegisterVm, BeginMigration, AnnounceRoot, CommitMigration, AbortMigration, ChangePolicy,
    UnregisterVm,
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
    root: bytes = field(_ROOT)  # the committed root
    #: the root the source announced for its fenced images (b"" until it did)
    announced: bytes = field(_ROOT, default=b"")
    #: ledger time after which the target may abort on its own (the timeout)
    deadline: float = field(Float(), default=0.0)
    #: the transfer version the source began with
    version: int = field(U64(255), default=1)
    #: why it aborted, and the kind of cause (AbortMigration's); "" otherwise
    reason: str = field(Text(256), default="")
    cause: str = field(Text(32), default="")


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


@wire.struct_type
class RequestRecord:
    """An operator request the ledger executed: its first outcome, kept for replays and
    for the query by request id (consensus.ledger.Ledger.request_status)."""

    operator: str = field(_NAME)
    nonce: str = field(Text(64))
    created: float = field(Float())
    digest: bytes = field(Bytes(32, exact=True))
    command: str = field(Text(64))  # the intent's wire tag
    subject: str = field(_ID)  # the VM or the migration id it was about
    result: bytes = field(Bytes(512))  # the encoded LedgerResult


@wire.struct_type
class DeletedVm:
    """A VM an operator deleted, with its last epoch: a VM registered again under the
    name starts above it, so a VM's epochs only grow."""

    vm: str = field(_VM)
    epoch: int = field(U64())


#: The item limits of LedgerSnapshot's lists (vms, migrations, clients, requests, deleted).
SNAPSHOT_LIMITS = (1_000_000, 1_000_000, 64, MAX_REMEMBERED, 1_000_000)


@wire.message("ledger.snapshot", max_size=wire.ABSOLUTE_MAX_SIZE)
class LedgerSnapshot:
    vms: tuple[VmRecord, ...] = field(ListOf(Struct(VmRecord), SNAPSHOT_LIMITS[0]))
    migrations: tuple[MigrationRecord, ...] = field(
        ListOf(Struct(MigrationRecord), SNAPSHOT_LIMITS[1])
    )
    policy: SetPolicy = field(Struct(SetPolicy))
    clients: tuple[ClientRecord, ...] = field(ListOf(Struct(ClientRecord), SNAPSHOT_LIMITS[2]))
    clock: float = field(Float())
    requests: tuple[RequestRecord, ...] = field(ListOf(Struct(RequestRecord), SNAPSHOT_LIMITS[3]))
    deleted: tuple[DeletedVm, ...] = field(ListOf(Struct(DeletedVm), SNAPSHOT_LIMITS[4]))


def v3_allowed(policy: SetPolicy, vm: str, source: str, target: str,
               regions: Mapping[str, str] | None = None) -> bool:
    """The rollout decision: never under the kill switch, nor from or to an excluded DC;
    always for targeted VMs, DCs or regions (``regions``: DC -> region, from the
    federation file); otherwise a stable hash of the VM id modulo 100 below the
    percentage."""
    if policy.kill_switch or source in policy.excluded_dcs or target in policy.excluded_dcs:
        return False
    if vm in policy.target_vms or source in policy.target_dcs or target in policy.target_dcs:
        return True
    if policy.target_regions and regions:
        if (regions.get(source) in policy.target_regions
                or regions.get(target) in policy.target_regions):
            return True
    bucket = int.from_bytes(hashlib.sha256(vm.encode()).digest()[:8], "big") % 100
    return bucket < policy.v3_percent


#: The kinds of abort cause (AbortMigration.cause). Only "verification" and the aborts
#: that are not an operator's cancel count against a v3 rollout.
ABORT_CAUSES = ("", "operator", "verification", "peer", "stall", "restart", "vm", "timeout",
                "other")


def recorded_policy(intent: SetPolicy) -> SetPolicy:
    """The policy the ledger records for an admin's ``intent``: lists sorted without
    repeats, its own bookkeeping started afresh (the rollout's counters count from here)."""
    return SetPolicy(
        intent.v3_percent, tuple(sorted(set(intent.target_dcs))),
        tuple(sorted(set(intent.target_vms))), intent.kill_switch,
        tuple(sorted(set(intent.target_regions))), tuple(sorted(set(intent.excluded_dcs))),
        intent.max_abort_percent, intent.min_ended, intent.max_verify_failures)


def rollout_after_end(policy: SetPolicy, aborted: bool, cause: str, mid: str) -> SetPolicy:
    """``policy`` after a v3 migration ``mid`` ended (``aborted`` for ``cause``): its
    counters moved on and, when a rule of the policy is crossed, the kill switch on with
    the reason. Deterministic, so every replica rolls back at the same ledger entry."""
    if policy.rolled_back:
        return policy  # already rolled back: v1 until an admin records a new policy
    counted = aborted and cause != "operator"
    ended = policy.v3_ended + 1
    aborts = policy.v3_aborted + counted
    verify = policy.v3_verify_failures + (aborted and cause == "verification")
    why = ""
    if policy.max_verify_failures and verify >= policy.max_verify_failures:
        why = (f"{verify} v3 migration{'s' if verify != 1 else ''} failed verification "
               f"(the policy allows "
               f"{policy.max_verify_failures - 1}); the last was {mid}")
    elif (policy.max_abort_percent and ended >= max(1, policy.min_ended)
            and aborts * 100 >= policy.max_abort_percent * ended):
        why = (f"{aborts} of {ended} v3 migrations aborted ({aborts * 100 // ended} % >= "
               f"max_abort_percent {policy.max_abort_percent}); the last was {mid}")
    return SetPolicy(
        policy.v3_percent, policy.target_dcs, policy.target_vms, policy.kill_switch or bool(why),
        policy.target_regions, policy.excluded_dcs, policy.max_abort_percent, policy.min_ended,
        policy.max_verify_failures, ended, aborts, verify, why[:256])
