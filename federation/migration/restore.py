"""Rebuilding a migration session after a restart: resume it or abort it, never lose it.

The inputs are the session's last persisted :class:`~federation.migration.vocabulary.SessionRecord`
and what the (caught-up) ledger replica says about the migration — its
``MigrationRecord``, or ``None`` if the ledger never recorded the begin. The
ledger's word comes first:

- committed: the source retires its copy, the target starts the VM at the new epoch;
- aborted: the source lifts the fence and runs the VM, the target discards its copy;
- begun: the side that may still finish does so — a source whose final round was
  delivered waits for the target's commit (re-sending the root), a target that had
  verified re-submits the commit, a target that was verifying verifies again — and
  everything else aborts: a source crash loses the dirty tracking and kills the VM's
  run, and a target crash loses the data plane state, so a fresh migration is the
  clean way on (DESIGN.md: source or target crash ends in a ledger abort);
- not recorded: a source that was still PLANNED submits its begin again, with the
  operator's request it kept (the ledger answers a request it executed with its first
  outcome); anything else means the replica is behind the record, and restoring must
  wait until it has caught up.

A source restored after its final round announces its fenced root again if the
ledger has not recorded it; a target takes the announced root from the ledger's
record. An abort in progress is asked for again the role's way (the source
submits it, the target asks the source and waits for the deadline).

A record already COMMITTED or ABORTED is final whatever the replica says: a session
only gets there on the ledger's decision, and a replica replaying its log after the
restart may still show the migration begun.

Every action a restored session emits is idempotent at the driver (fence, un-fence,
retire, start with the same epoch, discard), so a crash in the middle of carrying
them out is repaired by restoring again.
"""

from __future__ import annotations

from collections.abc import Mapping

from consensus.ledger import CommitMigration, MigrationRecord, SetPolicy
from federation.migration.rollout import DEFAULT_POLICY
from federation.migration.session import SessionBase
from federation.migration.source import SourceSession
from federation.migration.target import TargetSession
from federation.migration.vocabulary import (
    PEER_DOWN_GRACE,
    RETRANSMIT,
    STALL_TIMEOUT,
    DiscardIncoming,
    MigrationError,
    MigrationRoundDone,
    Phase,
    PrecopyLimits,
    Retire,
    Role,
    SessionRecord,
    StartAtTarget,
    Unfence,
    Verify,
)
from federation.migration.vocabulary import (
    MigrationAction as Action,
)
from mesh import wire
from mesh.core import Send

__all__ = ["restore", "decode_record"]


def decode_record(data: bytes) -> SessionRecord:
    """Raises :class:`MigrationError` naming what is wrong with stored bytes."""
    try:
        rec = wire.decode(data, expect=(SessionRecord,))
    except wire.WireError as exc:
        raise MigrationError(f"unreadable migration record: {exc}") from exc
    try:
        Phase(rec.phase)
        Role(rec.role)
    except ValueError as exc:
        raise MigrationError(f"migration record {rec.migration_id!r}: {exc}") from exc
    if rec.max_rounds < 1 or rec.downtime < 0:
        raise MigrationError(f"migration record {rec.migration_id!r}: bad limits")
    return rec


def _build(rec: SessionRecord, policy: SetPolicy,
           regions: Mapping[str, str] | None = None) -> SessionBase:
    limits = PrecopyLimits(rec.max_rounds, rec.downtime)
    layout = tuple((i.name, i.pages) for i in rec.layout)
    args = (rec.me, rec.migration_id, rec.vm, rec.source, rec.target, rec.epoch, limits,
            rec.version, rec.common, layout)
    session: SessionBase
    if rec.role == Role.SOURCE.value:
        session = SourceSession(*args, policy=policy, regions=regions)
    else:
        session = TargetSession(*args)
    session.load(rec)
    return session


def restore(
    data: bytes, ledger: MigrationRecord | None, now: float, policy: SetPolicy = DEFAULT_POLICY,
    regions: Mapping[str, str] | None = None,
) -> tuple[SessionBase, list[Action]]:
    """The rebuilt session and the actions that put the world back in line with it."""
    rec = decode_record(data)
    s = _build(rec, policy, regions)
    if ledger is not None and (ledger.migration_id, ledger.vm, ledger.source, ledger.target) != (
        rec.migration_id, rec.vm, rec.source, rec.target
    ):
        raise MigrationError(f"migration {rec.migration_id!r}: ledger record does not match")
    source = s.role is Role.SOURCE
    if isinstance(s, TargetSession):
        s.arm_timeout(now)
        s.announced = ledger.announced if ledger is not None else b""
    if s.phase in (Phase.COMMITTED, Phase.ABORTED):
        # A session reaches these only on the ledger's word, so the outcome was decided
        # before the crash; a replica still replaying its log may show the migration
        # begun, and acting on that would re-run an old migration's end: a source
        # retiring a VM that has since come back to it (migration-chaos seed 5651).
        return s, []
    if ledger is not None and ledger.state == "committed":
        if s.phase is Phase.COMMITTED:
            return s, []
        s.epoch = ledger.epoch + 1
        s.fenced = s.fenced or source
        act: Action = (Retire(s.vm, s.migration_id) if source
                       else StartAtTarget(s.vm, s.migration_id, s.epoch))
        return s, [act, *s.finish(now, Phase.COMMITTED)]
    if ledger is not None and ledger.state == "aborted":
        if s.phase is Phase.ABORTED:
            return s, []
        out: list[Action] = []
        if source:
            out.append(Unfence(s.vm, s.migration_id))
        elif s.layout:
            out.append(DiscardIncoming(s.vm, s.migration_id))
        return s, out + s.finish(now, Phase.ABORTED, s.reason or "aborted in the ledger")
    if ledger is None:
        if source and s.phase in (Phase.PLANNED, Phase.REFUSED):
            if s.phase is Phase.REFUSED:
                return s, []
            assert isinstance(s, SourceSession)
            try:
                begin = s.begin_command()
            except MigrationError as exc:
                return s, s.finish(now, Phase.REFUSED, str(exc))
            return s, [s.persist(), *s.submit(now, begin)]
        raise MigrationError(
            f"migration {rec.migration_id!r} is {rec.phase} here but not in the ledger: "
            "restore after the ledger replica has caught up"
        )
    # The ledger has the migration begun.
    if s.phase is Phase.ABORTING:
        return s, [s.persist(), *s.request_abort(now)]
    if source and s.final_sent:
        assert isinstance(s, SourceSession)
        s.phase = Phase.VERIFYING
        s.fenced_at = now
        return s, [
            s.persist(),
            Send(s.target, MigrationRoundDone(s.migration_id, s.round, True, s.root)),
            *(s.announce(now) if not ledger.announced else []),
            s.timer("retransmit", now + RETRANSMIT),
            # the fence bound restarts: the estimate it was made from died with the process
            s.timer("fence", now + PEER_DOWN_GRACE + STALL_TIMEOUT),
        ]
    if not source and s.phase is Phase.VERIFIED:
        return s, [s.persist(), *s.submit(now, CommitMigration(s.migration_id, s.root))]
    if not source and s.phase is Phase.FINAL:
        return s, [s.persist(), Verify(s.vm, s.migration_id),
                   s.timer("stall", now + STALL_TIMEOUT)]
    # PLANNED, BEGUN, PRECOPY, FENCED or FINAL at the source; BEGUN or PRECOPY at the
    # target; REFUSED at a source whose begin got in after all: abort.
    side = "source" if source else "target"
    reason = f"the {side} restarted in {rec.phase}"
    if s.phase is Phase.PLANNED and s.reason:
        reason = s.reason  # an operator's cancel, kept while the begin was on its way
    if s.phase is Phase.REFUSED or s.phase is Phase.PLANNED:
        s.phase = Phase.BEGUN
    return s, s.abort(now, reason)
