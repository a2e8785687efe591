"""Every transition and abort path of the target session, and restore for both roles."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.ledger import (
    MIGRATION_DEADLINE,
    BeginMigration,
    CommitMigration,
    MigrationRecord,
    SetPolicy,
)
from federation.migration.restore import decode_record, restore
from federation.migration.target import TargetSession
from federation.migration.vocabulary import (
    PEER_DOWN_GRACE,
    RETRANSMIT,
    ActionFailed,
    DiscardIncoming,
    ImageSize,
    LedgerAborted,
    LedgerCommitted,
    LedgerRefused,
    LedgerRootAnnounced,
    LoadDevice,
    MigrationDecline,
    MigrationError,
    MigrationOffer,
    MigrationReady,
    MigrationRoundDone,
    Phase,
    PrecopyLimits,
    PrepareIncoming,
    Retire,
    StartAtTarget,
    SubmitLedger,
    TargetVerified,
    TransferProgress,
    Unfence,
    Verify,
    record_key,
    timer_key,
)
from mesh import wire
from mesh.core import PeerDown, Persist, Received, Send, SetTimer, TimerFired
from tests.harness.ledger import AUTH
from tests.harness.migration_session import (
    abort_of,
    fenced,
    final,
    of,
    one,
    precopy,
    session,
    verifying,
)

LIMITS = PrecopyLimits(5, 0.5)
ROOT = b"R" * 32
OFFER = MigrationOffer("m1", "vm1", "dc1", "dc2", 3, (ImageSize("memory", 1000),), 3)

#: the begin of session() (a v3 transfer: the policy gives v3 to every VM)
BEGIN = BeginMigration("vm1", "dc1", "dc2", 3, "m1", AUTH, 3)


def target() -> TargetSession:
    t, actions = TargetSession.from_ledger("dc2", "m1", "vm1", "dc1", 3, LIMITS, 0.0)
    assert t.phase is Phase.BEGUN and isinstance(actions[0], Persist)
    return t


def offered(t: TargetSession) -> list[Any]:
    return t.handle(0.1, Received("dc1", OFFER))


def verifying_t(t: TargetSession) -> list[Any]:
    offered(t)
    t.handle(1.0, Received("dc1", MigrationRoundDone("m1", 1, False, b"")))
    return t.handle(2.0, Received("dc1", MigrationRoundDone("m1", 2, True, ROOT)))


def verified(t: TargetSession) -> list[Any]:
    verifying_t(t)
    t.handle(2.5, LedgerRootAnnounced("m1", ROOT))
    return t.handle(3.0, TargetVerified(ROOT))


def declined(t: TargetSession, actions: list[Any]) -> None:
    """The target gave up: it asks the source (its own abort waits for the deadline)."""
    assert of(actions, SubmitLedger) == []
    ask = one(actions, Send)
    assert ask.peer == "dc1" and ask.message == MigrationDecline("m1", t.reason)
    assert t.phase is Phase.ABORTING and abort_of(t.pending) == "m1"
    ledger_timer = [a for a in of(actions, SetTimer) if a.key == timer_key("m1", "ledger")]
    assert ledger_timer and ledger_timer[0].at == t.timeout_at


def test_from_ledger_refuses_itself_as_source() -> None:
    with pytest.raises(MigrationError, match="source is this DC"):
        TargetSession.from_ledger("dc2", "m1", "vm1", "dc2", 0, LIMITS, 0.0)


def test_offer_prepares_the_copy_and_answers_ready() -> None:
    t = target()
    actions = offered(t)
    prep = one(actions, PrepareIncoming)
    assert prep.layout == (("memory", 1000),) and prep.version == 3
    assert one(actions, Send).message == MigrationReady("m1")
    assert t.phase is Phase.PRECOPY
    again = offered(t)  # the source did not hear us: answer again, prepare nothing
    assert one(again, Send).message == MigrationReady("m1") and of(again, PrepareIncoming) == []


@pytest.mark.parametrize("change", [{"vm": "vm2"}, {"epoch": 2}, {"target": "dc3"}])
def test_offer_not_matching_the_ledger_is_ignored(change: dict[str, Any]) -> None:
    t = target()
    fields = {"migration_id": "m1", "vm": "vm1", "source": "dc1", "target": "dc2", "epoch": 3,
              "layout": OFFER.layout, "version": 3}
    fields.update(change)
    actions = t.handle(0.1, Received("dc1", MigrationOffer(**fields)))
    assert [a.kind for a in actions] == ["migration.ignored"] and t.phase is Phase.BEGUN


def test_offer_from_another_dc_is_ignored() -> None:
    t = target()
    assert [a.kind for a in t.handle(0.1, Received("dc3", OFFER))] == ["migration.ignored"]


@pytest.mark.parametrize("layout", [(), (ImageSize("memory", 0),),
                                    (ImageSize("memory", 4), ImageSize("memory", 4))])
def test_bad_layout_aborts(layout: tuple[ImageSize, ...]) -> None:
    t = target()
    bad = MigrationOffer("m1", "vm1", "dc1", "dc2", 3, layout, 3)
    actions = t.handle(0.1, Received("dc1", bad))
    declined(t, actions)
    assert of(actions, PrepareIncoming) == []


def test_final_round_done_starts_verification() -> None:
    t = target()
    actions = verifying_t(t)
    assert one(actions, Verify).vm == "vm1"
    assert t.phase is Phase.FINAL and t.root == ROOT and t.round == 2
    assert t.handle(2.5, Received("dc1", MigrationRoundDone("m1", 2, True, ROOT))) == []


def test_matching_root_commits_and_never_aborts_after() -> None:
    t = target()
    actions = verified(t)
    assert one(actions, SubmitLedger).command == CommitMigration("m1", ROOT)
    # the device state loads while the ledger commits; the start waits for the commit
    assert one(actions, LoadDevice) == LoadDevice("vm1", "m1")
    assert not [a for a in actions if isinstance(a, StartAtTarget)]
    assert t.phase is Phase.VERIFIED
    assert t.handle(4.0, ActionFailed("x", "y"))[0].kind == "migration.error"
    assert t.abort(4.0, "late") == []
    assert t.handle(5.0, TimerFired(timer_key("m1", "ledger")))[1] == SubmitLedger(
        CommitMigration("m1", ROOT))


def test_mismatching_root_gives_up() -> None:
    t = target()
    verifying_t(t)
    t.handle(2.5, LedgerRootAnnounced("m1", ROOT))
    actions = t.handle(3.0, TargetVerified(b"X" * 32))
    declined(t, actions)
    assert "does not match the root the source announced" in t.reason
    again = t.handle(3.0 + RETRANSMIT, TimerFired(timer_key("m1", "retransmit")))
    assert one(again, Send).message == MigrationDecline("m1", t.reason)
    late = t.handle(t.timeout_at, TimerFired(timer_key("m1", "ledger")))
    assert abort_of(one(late, SubmitLedger).command) == "m1"  # the timeout abort


def test_the_root_that_counts_is_the_one_announced_in_the_ledger() -> None:
    # The source's message says X (a lying or corrupted message); the ledger has ROOT,
    # and what the target wrote has ROOT: the target commits ROOT.
    t = target()
    offered(t)
    t.handle(2.0, Received("dc1", MigrationRoundDone("m1", 1, True, b"X" * 32)))
    assert one(t.handle(3.0, TargetVerified(ROOT)), SetTimer).key == timer_key("m1", "stall")
    assert t.phase is Phase.FINAL  # verified, waiting for the announcement
    actions = t.handle(3.5, LedgerRootAnnounced("m1", ROOT))
    assert one(actions, SubmitLedger).command == CommitMigration("m1", ROOT)
    assert t.phase is Phase.VERIFIED and t.root == ROOT


def test_the_commit_goes_before_the_announcement_and_again_after_a_refusal() -> None:
    # The final round named ROOT and the received images have it: commit at once, while
    # the source's announcement is still in the ledger's queue (they overlap).
    t = target()
    verifying_t(t)
    actions = t.handle(3.0, TargetVerified(ROOT))
    assert one(actions, SubmitLedger).command == CommitMigration("m1", ROOT)
    assert one(actions, LoadDevice) == LoadDevice("vm1", "m1")
    assert t.phase is Phase.VERIFIED and t.root == ROOT
    # ordered before the announcement: refused; submitted again once it is in the ledger
    refused = t.handle(3.2, LedgerRefused(CommitMigration("m1", ROOT), "not announced"))
    assert of(refused, SubmitLedger) == []
    again = t.handle(3.5, LedgerRootAnnounced("m1", ROOT))
    assert one(again, SubmitLedger).command == CommitMigration("m1", ROOT)
    assert of(t.handle(3.6, LedgerRootAnnounced("m1", ROOT)), SubmitLedger) == []
    assert of(t.handle(4.0, LedgerCommitted("m1", 4, ROOT)), StartAtTarget) == [
        StartAtTarget("vm1", "m1", 4)]


def test_an_early_commit_refused_after_the_announcement_came_is_sent_again_once() -> None:
    # this DC's ledger executed the refused commit and the announcement after it before
    # the refusal came back through the replies: the announcement is known first
    t = target()
    verifying_t(t)
    t.handle(3.0, TargetVerified(ROOT))
    assert of(t.handle(3.1, LedgerRootAnnounced("m1", ROOT)), SubmitLedger) == []
    again = t.handle(3.2, LedgerRefused(CommitMigration("m1", ROOT), "not announced"))
    assert one(again, SubmitLedger).command == CommitMigration("m1", ROOT)
    # a second refusal (the migration ended meanwhile) is left to the ledger's word
    assert of(t.handle(3.3, LedgerRefused(CommitMigration("m1", ROOT), "aborted")),
              SubmitLedger) == []


def test_an_early_commit_is_not_sent_again_for_another_announced_root() -> None:
    t = target()
    verifying_t(t)
    t.handle(3.0, TargetVerified(ROOT))
    t.handle(3.2, LedgerRefused(CommitMigration("m1", ROOT), "not announced"))
    # the source announced other bytes than its final round named: the ledger can never
    # take this commit; nothing runs here, and the ledger's abort discards the copy
    actions = t.handle(3.5, LedgerRootAnnounced("m1", b"X" * 32))
    assert of(actions, SubmitLedger) == [] and of(actions, StartAtTarget) == []
    assert one(t.handle(9.0, LedgerAborted("m1")), DiscardIncoming).vm == "vm1"


def test_start_only_after_the_commit_with_its_epoch() -> None:
    t = target()
    verified(t)
    actions = t.handle(4.0, LedgerCommitted("m1", 4, ROOT))
    assert one(actions, StartAtTarget).epoch == 4
    assert t.phase is Phase.COMMITTED


@pytest.mark.parametrize("stage", [lambda t: None, offered, verifying_t, verified])
def test_abort_in_the_ledger_discards_what_arrived(stage: Any) -> None:
    t = target()
    stage(t)
    actions = t.handle(9.0, LedgerAborted("m1"))
    assert len(of(actions, DiscardIncoming)) == (1 if t.layout else 0)
    assert t.phase is Phase.ABORTED and of(actions, StartAtTarget) == []


@pytest.mark.parametrize("stage", [lambda t: None, offered, verifying_t])
def test_stall_and_source_down_abort_before_verification(stage: Any) -> None:
    t = target()
    stage(t)
    declined(t, t.handle(3.0, TimerFired(timer_key("m1", "stall"))))
    t2 = target()
    stage(t2)
    timer = one(t2.handle(3.0, PeerDown("dc1")), SetTimer)
    assert timer.at == 3.0 + PEER_DOWN_GRACE
    declined(t2, t2.handle(timer.at, TimerFired(timer.key)))


def test_source_down_after_verification_does_not_abort() -> None:
    t = target()
    verified(t)
    assert t.handle(3.5, PeerDown("dc1")) == []


def test_progress_and_refusals() -> None:
    t = target()
    offered(t)
    assert one(t.handle(1.0, TransferProgress(1, 4096)), SetTimer).key == timer_key("m1", "stall")
    assert t.bytes_sent == 4096
    r = t.handle(1.0, LedgerRefused(CommitMigration("m1", ROOT), "already aborted"))
    assert [a.kind for a in r] == ["migration.ledger-refused"]


# --------------------------------------------------------------------------- restore


def ledger_rec(state: str, announced: bytes = ROOT) -> MigrationRecord:
    return MigrationRecord("m1", "vm1", "dc1", "dc2", 3, state, ROOT if state == "committed"
                           else b"", announced)


def saved(actions: list[Any]) -> bytes:
    return [a for a in actions if isinstance(a, Persist) and a.key == record_key("m1")][-1].value


def test_record_round_trips_and_bad_bytes_are_refused() -> None:
    s = session()
    rec = decode_record(saved(precopy(s)))
    assert rec.phase == "precopy" and rec.round == 1 and rec.role == "source"
    with pytest.raises(MigrationError, match="unreadable"):
        decode_record(b"\x00garbage")
    bad = wire.encode(attrs.evolve(rec, phase="dancing"))
    with pytest.raises(MigrationError, match="dancing"):
        decode_record(bad)


@pytest.mark.parametrize("stage", [precopy, fenced, final, verifying])
def test_source_restore_follows_the_ledger(stage: Any) -> None:
    s = session()
    data = saved(stage(s))
    r, actions = restore(data, ledger_rec("committed"), 50.0)
    assert r.phase is Phase.COMMITTED and one(actions, Retire) and r.epoch == 4
    r, actions = restore(data, ledger_rec("aborted"), 50.0)
    assert r.phase is Phase.ABORTED and one(actions, Unfence)


@pytest.mark.parametrize("stage", [precopy, fenced, final])
def test_source_restart_before_the_final_round_is_delivered_aborts(stage: Any) -> None:
    s = session()
    r, actions = restore(saved(stage(s)), ledger_rec("begun"), 50.0)
    assert r.phase is Phase.ABORTING and "restarted" in r.reason
    assert abort_of(one(actions, SubmitLedger).command) == "m1"
    assert of(actions, Unfence) == []


def test_source_restart_after_the_final_round_waits_for_the_commit() -> None:
    s = session()
    r, actions = restore(saved(verifying(s)), ledger_rec("begun"), 50.0)
    assert r.phase is Phase.VERIFYING
    assert one(actions, Send).message == MigrationRoundDone("m1", 2, True, ROOT)
    assert one(r.handle(51.0, LedgerCommitted("m1", 4, ROOT)), Retire)


@pytest.mark.parametrize("outcome", ["committed", "aborted"])
@pytest.mark.parametrize("replica_shows", ["begun", None])
def test_a_finished_session_stays_finished_whatever_a_replaying_replica_shows(
    outcome: str, replica_shows: str | None,
) -> None:
    # The source committed (or aborted) before the crash; at the restart its replica,
    # still replaying its log, shows the migration begun (or not yet recorded). The VM
    # may have moved again since (back to this DC): nothing may be retired, un-fenced
    # or submitted again (migration-chaos seed 5651 retired a VM at its owner).
    s = session()
    verifying(s)
    event = (LedgerCommitted("m1", 4, ROOT) if outcome == "committed"
             else LedgerAborted("m1"))
    data = saved(s.handle(10.0, event))
    rec = ledger_rec(replica_shows) if replica_shows else None
    r, actions = restore(data, rec, 50.0)
    assert r.phase.value == outcome and r.done and actions == []
    assert r.handle(51.0, event) == []  # the replay's decision, when it comes, is no news


def test_source_planned_resubmits_begin_when_the_ledger_has_nothing() -> None:
    s = session()
    r, actions = restore(saved(s.start(0.0)), None, 5.0)
    assert one(actions, SubmitLedger).command == BEGIN
    assert r.phase is Phase.PLANNED


def test_restore_ahead_of_the_ledger_is_refused() -> None:
    s = session()
    with pytest.raises(MigrationError, match="caught up"):
        restore(saved(precopy(s)), None, 5.0)
    with pytest.raises(MigrationError, match="does not match"):
        restore(saved(precopy(session())), MigrationRecord("m1", "vm9", "dc1", "dc2", 3,
                                                           "begun", b""), 5.0)


def test_aborting_source_resubmits_its_abort() -> None:
    s = session()
    precopy(s)
    data = saved(s.handle(1.0, ActionFailed("send round", "x")))
    r, actions = restore(data, ledger_rec("begun"), 5.0)
    assert r.phase is Phase.ABORTING
    assert abort_of(one(actions, SubmitLedger).command) == "m1"


def test_target_restore_paths() -> None:
    t = target()
    data = saved(verified(t))
    r, actions = restore(data, ledger_rec("begun"), 5.0)
    assert r.phase is Phase.VERIFIED
    assert one(actions, SubmitLedger).command == CommitMigration("m1", ROOT)
    r, actions = restore(data, ledger_rec("committed"), 5.0)
    assert one(actions, StartAtTarget).epoch == 4 and r.phase is Phase.COMMITTED
    r, actions = restore(data, ledger_rec("aborted"), 5.0)
    assert one(actions, DiscardIncoming) and r.phase is Phase.ABORTED
    t2 = target()
    r, actions = restore(saved(verifying_t(t2)), ledger_rec("begun"), 5.0)
    assert r.phase is Phase.FINAL and one(actions, Verify)
    assert one(r.handle(6.0, TargetVerified(ROOT)), SubmitLedger).command == CommitMigration(
        "m1", ROOT)  # the announced root came with the ledger's record
    t3 = target()
    r, actions = restore(saved(offered(t3)), ledger_rec("begun"), 5.0)
    assert r.phase is Phase.ABORTING and "target restarted" in r.reason
    assert isinstance(r, TargetSession)
    declined(r, actions)
    assert r.timeout_at == 5.0 + MIGRATION_DEADLINE
    with pytest.raises(MigrationError, match="caught up"):
        restore(saved(offered(target())), None, 5.0)


def test_restored_terminal_sessions_do_nothing() -> None:
    s = session()
    verifying(s)
    data = saved(s.handle(2.0, LedgerCommitted("m1", 4, ROOT)))
    r, actions = restore(data, ledger_rec("committed"), 9.0)
    assert actions == [] and r.done
    policy = SetPolicy(0, (), (), True)
    r, _ = restore(data, ledger_rec("committed"), 9.0, policy)
    assert r.handle(10.0, TimerFired(timer_key("m1", "stall"))) == []


@given(st.binary(max_size=300))
def test_decode_record_raises_only_migration_error(data: bytes) -> None:
    try:
        decode_record(data)
    except MigrationError:
        pass


@given(st.integers(0, 30), st.binary(min_size=1, max_size=8))
def test_decode_record_of_a_mutated_record(pos: int, junk: bytes) -> None:
    good = saved(precopy(session()))
    i = pos % len(good)
    try:
        rec = decode_record(good[:i] + junk + good[i + len(junk):])
    except MigrationError:
        return
    assert isinstance(rec.phase, str)
