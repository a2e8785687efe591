"""The replicated ledger: who owns each VM, migrations, the rollout policy — and who may
change them.

A deterministic state machine. PBFT orders the commands; every replica applies
them in the same order through :meth:`Ledger.execute` and so holds the same
state, summarised by :meth:`Ledger.state_digest` in checkpoints. The ledger
authorizes as well as orders (DESIGN.md, "Operators and authorization"): a
command comes from a DC (its PBFT request is signed by the DC's key and checked
before execution), and what a DC may ask for depends on the command
(:mod:`consensus.ledger_commands`):

- ``RegisterVm(vm, owner, authorization)``: an operator (role ``operator``) asked
  to import ``vm`` at ``owner``, and ``owner`` submits it. Epoch 0, or one above
  the epoch of a deleted VM of that name.
- ``BeginMigration(vm, source, target, epoch, migration_id, authorization)``: an
  operator asked to move ``vm`` from ``source`` at ``epoch`` to ``target`` (the
  intent names all four); only the source, which owns the VM at exactly ``epoch``,
  submits it; no other migration of the VM may be in
  progress. The migration's deadline is ledger time + ``MIGRATION_DEADLINE``.
- ``AnnounceRoot(migration_id, root)``: only the source, while begun, once.
- ``CommitMigration(migration_id, root)``: only the target, while begun, and only
  with the root the source announced; the target becomes the owner, epoch + 1.
- ``AbortMigration(migration_id, authorization?)``: the source; any DC carrying
  an operator's cancel; the target only once the deadline has passed (timeout).
  Ownership stays at the source.
- ``ChangePolicy(authorization)``: an admin's policy, submitted by any DC. The ledger
  keeps the rollout's counters in the policy and rolls back to v1 on its own (the kill
  switch, with the reason) at the commit or abort of a v3 migration that crosses a
  threshold the policy names (``rollout_after_end``): every replica at the same entry.
- ``UnregisterVm(vm, authorization)``: an operator's delete, by any DC, only with
  no migration in flight (also how a stuck import is cleaned up).

So a DC on its own can neither import, migrate, cancel, change the policy nor
delete, and a Byzantine DC cannot take a VM it does not own: it can neither
begin a migration of it nor commit without the owner's announced root.

Operator requests are checked by every replica in execution: signature, role,
freshness and replay (:mod:`consensus.authz`, :mod:`consensus.operator_requests`).

**Ledger time** is what freshness and the migration deadline are measured
against, and it must be the same at every replica. :meth:`Ledger.execute`
takes it as ``now``: the time the PBFT primary stamped on the ordered batch,
checked by the backups against their own clocks (:mod:`consensus.pbft.batch_time`),
so the clock advances with every batch and a deadline passes on time. A request
is then fresh when its ``created`` lies within ``FRESHNESS_WINDOW`` of that clock,
either way. Without ``now`` (a ledger driven outside PBFT, as in some tests) the
clock is the largest ``created`` of the operator requests it executed. Either way
the clock never goes back.

A command that breaks a rule is *refused*: the state does not change and the
result says why; :attr:`Ledger.refusals` counts refusals by kind. The invariants
(one owner per VM, epochs only grow, commit only from begun with a matching id)
are checked after every command by :meth:`check_invariants`; a violation raises
:class:`LedgerInvariantError`, which is a bug, never a user error.

Exactly-once: the ledger remembers, per client, the results of its last
``CLIENT_WINDOW`` request ids; a duplicate returns the remembered result without
executing again, and an id older than the window is refused. Operator requests
are exactly-once by their own request id as well (``request_status``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

from consensus.authz import (
    AuthError,
    Authorization,
    Opened,
    OperatorTable,
    Role,
    check_fresh,
    check_role,
    open_authorization,
)
from consensus.ledger_commands import (
    ABORT_CAUSES,
    CLIENT_WINDOW,
    COMMAND_TYPES,
    INTENT_TYPES,
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    CancelMigration,
    ChangePolicy,
    CommitMigration,
    DeleteVm,
    ImportVm,
    LedgerResult,
    MigrateVm,
    MigrationRecord,
    RegisterVm,
    RequestRecord,
    SetPolicy,
    UnregisterVm,
    VmRecord,
    recorded_policy,
    rollout_after_end,
    v3_allowed,
)
from consensus.ledger_state import LedgerInvariantError, LedgerState, RequestStatus
from mesh import versions, wire

__all__ = [
    "CLIENT_WINDOW",
    "MIGRATION_DEADLINE",
    "LedgerInvariantError",
    "RegisterVm",
    "BeginMigration",
    "AnnounceRoot",
    "CommitMigration",
    "AbortMigration",
    "ChangePolicy",
    "UnregisterVm",
    "ImportVm",
    "MigrateVm",
    "CancelMigration",
    "DeleteVm",
    "SetPolicy",
    "LedgerResult",
    "MigrationRecord",
    "VmRecord",
    "RequestStatus",
    "Ledger",
    "COMMAND_TYPES",
    "INTENT_TYPES",
    "v3_allowed",
    "recorded_policy",
    "rollout_after_end",
    "ABORT_CAUSES",
]

#: Ledger seconds after its begin from which the target may abort a migration on its
#: own (the timeout). Ten times the slowest honest ending of a session in
#: migration-chaos (a fenced source waits PEER_DOWN_GRACE, 30 s, plus its fence slack,
#: then a view change and LEDGER_RESUBMIT: under 60 s, sim.scenarios.migration_chaos
#: QUIET): before it, only the source or an operator ends a migration.
MIGRATION_DEADLINE = 600.0


def _migration(mig: MigrationRecord, *, state: str | None = None, root: bytes | None = None,
               announced: bytes | None = None, reason: str = "",
               cause: str = "") -> MigrationRecord:
    """``mig`` with some fields replaced (records are frozen and replaced on change)."""
    return MigrationRecord(
        mig.migration_id, mig.vm, mig.source, mig.target, mig.epoch,
        mig.state if state is None else state, mig.root if root is None else root,
        mig.announced if announced is None else announced, mig.deadline, mig.version,
        reason or mig.reason, cause or mig.cause)


def _vm(rec: VmRecord, migration_id: str | None) -> VmRecord:
    return VmRecord(rec.vm, rec.owner, rec.epoch, migration_id)


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


class Ledger(LedgerState):
    """The deterministic ledger state machine (see the module docstring)."""

    def __init__(self, members: Iterable[str], operators: OperatorTable | None = None) -> None:
        super().__init__(members, operators)
        self._trusted_now = False
        self._touched: list[str] = []
        self._touched_requests: list[tuple[str, str]] = []
        self._touched_deleted: list[str] = []

    # ------------------------------------------------------------------ execution

    def execute(self, client: str, request_id: int, command: bytes,
                now: float | None = None) -> bytes:
        """Apply one ordered request exactly once and return its encoded result.

        ``now``: the ledger time of the batch this request was ordered in, the same at
        every replica (module docstring); None: the clock follows operator requests."""
        return self.execute_once(client, request_id, command, now)[0]

    def execute_once(self, client: str, request_id: int, command: bytes,
                     now: float | None = None) -> tuple[bytes, bool]:
        """:meth:`execute`, and whether the request was applied now (False: a duplicate,
        answered from the exactly-once window; the PBFT replica reports only the requests
        it applied, and asking :meth:`executed_result` first would look it up twice)."""
        known = self.executed_result(client, request_id)
        if known is not None:
            return known, False
        self._touched, self._touched_migrations = [], []
        self._touched_requests, self._touched_deleted = [], []
        self._trusted_now = now is not None
        if now is not None:
            self._advance(now)
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
        self._encoder.touched_rest(self.requests.records, self._touched_requests,
                                   self.deleted, self._touched_deleted)
        return result, True

    def _advance(self, now: float) -> None:
        if now > self.clock:
            self.clock = now
            self._touched_requests += self.requests.expire(now)

    def _apply(self, client: str, command: bytes) -> LedgerResult:
        try:
            cmd = wire.decode(command, expect=COMMAND_TYPES)
        except wire.WireError as exc:
            return self._refuse("rule", f"malformed command: {exc}")
        if isinstance(cmd, RegisterVm):
            return self._register(client, cmd)
        if isinstance(cmd, BeginMigration):
            return self._begin(client, cmd)
        if isinstance(cmd, AnnounceRoot):
            return self._announce(client, cmd)
        if isinstance(cmd, CommitMigration):
            return self._commit(client, cmd)
        if isinstance(cmd, AbortMigration):
            return self._abort(client, cmd)
        if isinstance(cmd, ChangePolicy):
            return self._change_policy(cmd)
        return self._unregister(cmd)

    def _refuse(self, kind: str, error: str, epoch: int = 0) -> LedgerResult:
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        return LedgerResult(False, error[:256], epoch)

    # ------------------------------------------------------------------ operator requests

    def _open(self, auth: Authorization, intent: type,
              **expect: object) -> tuple[Opened, Any] | LedgerResult:
        """The operator's signed request and its body, which must be an ``intent`` whose
        fields ``expect`` names say what the command says."""
        try:
            opened, body = open_authorization(self.operators, auth)
        except AuthError as exc:
            return self._refuse("authorization", f"operator request: {exc}")
        if not isinstance(body, intent):
            return self._refuse("authorization", f"operator request: the signed body is "
                                f"{wire.tag_of(body)}, this command needs {intent.wire_tag}")  # type: ignore[attr-defined]
        asked = {k: getattr(body, k) for k in expect}
        if asked != expect:
            said = ", ".join(f"{k}={v!r}" for k, v in asked.items())
            here = ", ".join(f"{k}={v!r}" for k, v in expect.items())
            return self._refuse("authorization", f"the operator asked for {said}, "
                                f"not {here}")
        return opened, body

    def _as_operator(self, opened: Opened, intent: Any, need: Role, subject: str,
                     apply: Callable[[], LedgerResult]) -> LedgerResult:
        """Replay, freshness, role, then ``apply``; the outcome is remembered under the
        request id. A replay of the same request returns its first outcome. A request
        that fails a check of its own (expired, a role too low, the book full) is
        refused without touching the state: neither recorded nor moving the clock, so
        that no one below ``need`` can move ledger time."""
        head = opened.head
        seen = self.requests.get(head.operator, head.nonce)
        if seen is not None:
            if seen.digest == opened.digest:
                return wire.decode(seen.result, expect=(LedgerResult,))  # type: ignore[no-any-return]
            return self._refuse("authorization", f"operator request: request id {head.nonce} "
                                f"of {head.operator!r} was already used by another request")
        clock = self.clock if self._trusted_now else max(self.clock, head.created)
        try:
            check_fresh(head, self.clock, future=self._trusted_now)
            check_role(opened.operator, need)
            gone = self.requests.make_room(clock)
        except AuthError as exc:
            return self._refuse("authorization", f"operator request: {exc}")
        self._touched_requests += gone
        self._advance(clock)  # a fresh request of the right role: its time has come
        result = apply()
        rec = RequestRecord(head.operator, head.nonce, head.created, opened.digest,
                            wire.tag_of(intent), subject[:128], _encoded(result))
        self._touched_requests.append(self.requests.add(rec))
        return result

    # ------------------------------------------------------------------ commands

    def _register(self, client: str, cmd: RegisterVm) -> LedgerResult:
        got = self._open(cmd.authorization, ImportVm, vm=cmd.vm, dc=cmd.owner)
        if isinstance(got, LedgerResult):
            return got
        opened, intent = got
        if client != cmd.owner:
            return self._refuse("authorization", f"only {cmd.owner!r}, the DC the operator "
                                f"named, registers {cmd.vm!r}; not {client!r}")

        def apply() -> LedgerResult:
            if cmd.owner not in self.members:
                return self._refuse("rule", f"owner {cmd.owner!r} is not a member")
            if cmd.vm in self.vms:
                return self._refuse("rule", f"VM {cmd.vm!r} is already registered")
            epoch = self.deleted.pop(cmd.vm, -1) + 1
            if epoch:
                self._touched_deleted.append(cmd.vm)
            self.vms[cmd.vm] = VmRecord(cmd.vm, cmd.owner, epoch, None)
            self._touched.append(cmd.vm)
            return LedgerResult(True, epoch=epoch)

        return self._as_operator(opened, intent, Role.OPERATOR, cmd.vm, apply)

    def _begin(self, client: str, cmd: BeginMigration) -> LedgerResult:
        rec = self.vms.get(cmd.vm)
        if rec is None:
            return self._refuse("rule", f"VM {cmd.vm!r} is not registered")
        got = self._open(cmd.authorization, MigrateVm, vm=cmd.vm, target=cmd.target,
                         source=cmd.source, epoch=cmd.epoch)
        if isinstance(got, LedgerResult):
            return got
        opened, intent = got
        if client != cmd.source or rec.owner != client:
            return self._refuse("authorization", f"VM {cmd.vm!r} is owned by {rec.owner!r}: "
                                f"only its owner begins its migration, not {client!r}",
                                rec.epoch)

        def apply() -> LedgerResult:
            if cmd.target not in self.members or cmd.target == cmd.source:
                return self._refuse("rule", f"target {cmd.target!r} is not another member")
            if rec.epoch != cmd.epoch:
                return self._refuse("rule", f"stale epoch {cmd.epoch}, VM is at {rec.epoch}",
                                    rec.epoch)
            if rec.migration_id is not None:
                return self._refuse("rule", f"migration {rec.migration_id!r} is in progress",
                                    rec.epoch)
            if cmd.migration_id in self.migrations:
                return self._refuse("rule", f"migration id {cmd.migration_id!r} was used before")
            self.migrations[cmd.migration_id] = MigrationRecord(
                cmd.migration_id, cmd.vm, cmd.source, cmd.target, cmd.epoch, "begun", b"",
                b"", self.clock + MIGRATION_DEADLINE, cmd.version)
            self.vms[cmd.vm] = _vm(rec, cmd.migration_id)
            self._touched.append(cmd.vm)
            self._touched_migrations.append(cmd.migration_id)
            return LedgerResult(True, epoch=rec.epoch)

        return self._as_operator(opened, intent, Role.OPERATOR, cmd.migration_id, apply)

    def _begun(self, mid: str) -> MigrationRecord | LedgerResult:
        mig = self.migrations.get(mid)
        if mig is None:
            return self._refuse("rule", f"no migration {mid!r}")
        if mig.state != "begun":
            return self._refuse("rule", f"migration {mid!r} is already {mig.state}")
        if self.vms[mig.vm].migration_id != mid:
            raise LedgerInvariantError(f"VM {mig.vm!r} does not point at begun migration {mid!r}")
        return mig

    def _announce(self, client: str, cmd: AnnounceRoot) -> LedgerResult:
        mig = self._begun(cmd.migration_id)
        if isinstance(mig, LedgerResult):
            return mig
        if client != mig.source:
            return self._refuse("authorization", f"only {mig.source!r}, the source, announces "
                                f"the root of migration {mig.migration_id!r}; not {client!r}")
        if not cmd.root:
            return self._refuse("rule", "an announcement carries the root")
        if mig.announced:
            if mig.announced == cmd.root:
                return LedgerResult(True, epoch=mig.epoch)  # the same statement again
            return self._refuse("rule", f"migration {mig.migration_id!r}: the source already "
                                "announced another root")
        self.migrations[mig.migration_id] = _migration(mig, announced=cmd.root)
        self._touched_migrations.append(mig.migration_id)
        return LedgerResult(True, epoch=mig.epoch)

    def _commit(self, client: str, cmd: CommitMigration) -> LedgerResult:
        mig = self._begun(cmd.migration_id)
        if isinstance(mig, LedgerResult):
            return mig
        mid = mig.migration_id
        if client != mig.target:
            return self._refuse("authorization", f"only {mig.target!r}, the target, commits "
                                f"migration {mid!r}; not {client!r}")
        if not mig.announced:
            return self._refuse("rule", f"migration {mid!r}: the source has not announced "
                                "the root of its fenced images")
        if cmd.root != mig.announced:
            return self._refuse("rule", f"migration {mid!r}: the target's root is not the "
                                "root the source announced")
        rec = self.vms[mig.vm]
        self.vms[mig.vm] = VmRecord(mig.vm, mig.target, rec.epoch + 1, None)
        self.migrations[mid] = _migration(mig, state="committed", root=cmd.root)
        self._touched.append(mig.vm)
        self._touched_migrations.append(mid)
        self._rollout_count(mig, aborted=False, cause="")
        return LedgerResult(True, epoch=rec.epoch + 1)

    def _end(self, mig: MigrationRecord, reason: str, cause: str) -> LedgerResult:
        rec = self.vms[mig.vm]
        self.vms[mig.vm] = _vm(rec, None)
        cause = cause if cause in ABORT_CAUSES else "other"
        self.migrations[mig.migration_id] = _migration(
            mig, state="aborted", root=b"", reason=reason[:256], cause=cause)
        self._touched.append(mig.vm)
        self._touched_migrations.append(mig.migration_id)
        self._rollout_count(mig, aborted=True, cause=cause)
        return LedgerResult(True, epoch=rec.epoch)

    def _rollout_count(self, mig: MigrationRecord, aborted: bool, cause: str) -> None:
        """A v3 migration ended: the rollout's counters, and its rollback when the policy's
        threshold is crossed (consensus.ledger_commands.rollout_after_end)."""
        if mig.version == versions.V3:
            self.policy = rollout_after_end(self.policy, aborted, cause, mig.migration_id)

    def _abort(self, client: str, cmd: AbortMigration) -> LedgerResult:
        mid = cmd.migration_id
        if cmd.authorization is not None:
            if mid not in self.migrations:
                return self._refuse("rule", f"no migration {mid!r}")
            got = self._open(cmd.authorization, CancelMigration, migration_id=mid)
            if isinstance(got, LedgerResult):
                return got
            opened, intent = got

            def apply() -> LedgerResult:
                mig = self._begun(mid)
                if isinstance(mig, LedgerResult):
                    return mig
                return self._end(mig, cmd.reason or "cancelled by operator", "operator")

            return self._as_operator(opened, intent, Role.OPERATOR, mid, apply)
        mig = self._begun(mid)
        if isinstance(mig, LedgerResult):
            return mig
        if client == mig.source:
            return self._end(mig, cmd.reason, cmd.cause)
        if client == mig.target:
            if self.clock >= mig.deadline:
                return self._end(mig, cmd.reason or f"the target {client} timed out: the "
                                 f"deadline, ledger time {mig.deadline:.3f}, passed", "timeout")
            return self._refuse("authorization", f"the target aborts migration {mid!r} only "
                                f"by timeout: its deadline is ledger time {mig.deadline:.3f}, "
                                f"now {self.clock:.3f}")
        return self._refuse("authorization", f"{client!r} is neither the source nor the "
                            f"target of migration {mid!r}; cancelling it takes an operator")

    def _change_policy(self, cmd: ChangePolicy) -> LedgerResult:
        got = self._open(cmd.authorization, SetPolicy)
        if isinstance(got, LedgerResult):
            return got
        opened, policy = got

        def apply() -> LedgerResult:
            self.policy = recorded_policy(policy)
            return LedgerResult(True)

        return self._as_operator(opened, policy, Role.ADMIN, "policy", apply)

    def _unregister(self, cmd: UnregisterVm) -> LedgerResult:
        got = self._open(cmd.authorization, DeleteVm, vm=cmd.vm)
        if isinstance(got, LedgerResult):
            return got
        opened, intent = got

        def apply() -> LedgerResult:
            rec = self.vms.get(cmd.vm)
            if rec is None:
                return self._refuse("rule", f"VM {cmd.vm!r} is not registered")
            if rec.migration_id is not None:
                return self._refuse("rule", f"VM {cmd.vm!r} is migrating "
                                    f"({rec.migration_id}); cancel it first", rec.epoch)
            del self.vms[cmd.vm]
            self.deleted[cmd.vm] = rec.epoch
            self._touched.append(cmd.vm)
            self._touched_deleted.append(cmd.vm)
            return LedgerResult(True, epoch=rec.epoch)

        return self._as_operator(opened, intent, Role.OPERATOR, cmd.vm, apply)
