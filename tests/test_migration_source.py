"""Every transition and abort path of the source session, one event at a time."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest

from consensus.ledger import AbortMigration, BeginMigration, SetPolicy
from federation.migration.rollout import RolloutError
from federation.migration.source import SourceSession
from federation.migration.vocabulary import (
    LIMITS,
    PEER_DOWN_GRACE,
    RETRANSMIT,
    STALL_TIMEOUT,
    ActionFailed,
    CancelRequested,
    CancelRound,
    Fence,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    MigrationError,
    MigrationOffer,
    MigrationReady,
    MigrationRoundDone,
    Outcome,
    Phase,
    PolicyChanged,
    PrecopyLimits,
    Progress,
    Retire,
    RoundSent,
    SendRound,
    SourceFenced,
    SubmitLedger,
    TransferProgress,
    Unfence,
    limits_for,
    timer_key,
)
from mesh.core import Notify, PeerDown, PeerUp, Persist, Received, Send, SetTimer, TimerFired
from mesh.links.modes import Mode
from tests.harness.ledger import AUTH
from tests.harness.migration_session import (
    DC_LIMITS,
    LAYOUT,
    V3_ALL,
    abort_of,
    begun,
    fenced,
    final,
    of,
    one,
    precopy,
    session,
    verifying,
)

#: the begin of session() (a v3 transfer: the policy gives v3 to every VM)
BEGIN = BeginMigration("vm1", "dc1", "dc2", 3, "m1", AUTH, 3)


def test_limits_follow_the_mode() -> None:
    assert limits_for(Mode.DATACENTER) == PrecopyLimits(5, 0.5)
    assert limits_for(Mode.HYBRID) == PrecopyLimits(7, 5.0)
    assert limits_for(Mode.INTERNET) == PrecopyLimits(10, 90.0)
    assert limits_for(None) == LIMITS[Mode.INTERNET]


def test_plan_refuses_self_target_empty_layout_and_no_common_version() -> None:
    with pytest.raises(MigrationError, match="target"):
        SourceSession.plan("dc1", "m", "vm", "dc1", 0, LAYOUT, LIMITS[Mode.HYBRID], V3_ALL,
                           (1, 3), (1, 3), AUTH)
    with pytest.raises(MigrationError, match="no images"):
        SourceSession.plan("dc1", "m", "vm", "dc2", 0, (), LIMITS[Mode.HYBRID], V3_ALL,
                           (1, 3), (1, 3), AUTH)
    with pytest.raises(RolloutError):
        SourceSession.plan("dc1", "m", "vm", "dc2", 0, LAYOUT, LIMITS[Mode.HYBRID], V3_ALL,
                           (1,), (3,), AUTH)


def test_start_persists_then_submits_begin() -> None:
    s = session()
    actions = s.start(0.0)
    assert isinstance(actions[0], Persist)
    assert one(actions, SubmitLedger).command == BEGIN
    assert s.phase is Phase.PLANNED
    with pytest.raises(MigrationError, match="already started"):
        s.start(0.0)


def test_begin_unanswered_is_resubmitted() -> None:
    s = session()
    s.start(0.0)
    again = s.handle(10.0, TimerFired(timer_key("m1", "ledger")))
    assert isinstance(one(again, SubmitLedger).command, BeginMigration)


def test_begun_sends_offer_and_retransmits_it() -> None:
    s = session()
    actions = begun(s)
    assert s.phase is Phase.BEGUN
    offer = one(actions, Send).message
    assert isinstance(offer, MigrationOffer) and offer.version == 3 and offer.epoch == 3
    assert [(i.name, i.pages) for i in offer.layout] == list(LAYOUT)
    again = s.handle(0.1 + RETRANSMIT, TimerFired(timer_key("m1", "retransmit")))
    assert isinstance(one(again, Send).message, MigrationOffer)
    assert s.handle(0.2, LedgerBegun("m1", 3)) == []  # a duplicate fact changes nothing


def test_refused_begin_ends_without_a_ledger_entry() -> None:
    s = session()
    s.start(0.0)
    cmd = BEGIN
    actions = s.handle(0.1, LedgerRefused(cmd, "stale epoch 3, VM is at 4"))
    assert s.phase is Phase.REFUSED
    done = [a.detail for a in of(actions, Notify) if a.kind == "migration.done"]
    assert done[0].outcome == "refused" and "stale epoch" in done[0].reason


def test_begin_recorded_after_a_refusal_is_aborted() -> None:
    s = session()
    s.start(0.0)
    s.handle(0.1, LedgerRefused(BEGIN, "in progress"))
    actions = s.handle(0.2, LedgerBegun("m1", 3))
    assert s.phase is Phase.ABORTING
    assert abort_of(one(actions, SubmitLedger).command) == "m1"


def test_ready_starts_round_one_against_the_target_store() -> None:
    s = session()
    actions = precopy(s)
    r = one(actions, SendRound)
    assert (r.round, r.dirty, r.final, r.version) == (1, False, False, 3)
    assert s.phase is Phase.PRECOPY
    assert s.handle(0.3, Received("dc2", MigrationReady("m1"))) == []  # duplicate ready


def test_messages_from_others_are_ignored() -> None:
    s = session()
    begun(s)
    actions = s.handle(0.2, Received("dc3", MigrationReady("m1")))
    assert [a.kind for a in actions] == ["migration.ignored"] and s.phase is Phase.BEGUN


def test_rounds_continue_while_the_dirty_set_is_too_big() -> None:
    s = session()
    precopy(s)
    # 1000 dirty pages at round 1's cost per page on the wire (500 KB in 1 s: 8.2 ms a
    # page; its 1 MB covered counts pages the target held): an 8 s final round, over 0.5 s
    actions = s.handle(2.0, RoundSent(1, 100, 1_000_000, 500_000, 1.0, dirty_pages=1000))
    r = one(actions, SendRound)
    assert (r.round, r.dirty, r.final) == (2, True, False)
    done = one(actions, Send).message
    assert isinstance(done, MigrationRoundDone) and not done.final
    progress = [a.detail for a in of(actions, Notify) if isinstance(a.detail, Progress)][-1]
    assert progress.round == 2 and progress.dirty_rate == 1000.0
    assert progress.eta == pytest.approx(1000 * 4096 / 500_000)
    assert s.bytes_sent == 1_000_000 and s.wire_bytes == 500_000


def test_converges_when_the_final_round_fits_the_downtime() -> None:
    s = session()
    actions = fenced(s)
    assert s.phase is Phase.FENCED and s.fenced
    persists = [i for i, a in enumerate(actions) if isinstance(a, Persist)]
    fence = [i for i, a in enumerate(actions) if isinstance(a, Fence)]
    assert persists and fence and persists[0] < fence[0], "the fence is persisted first"
    assert of(actions, SendRound) == []


def test_round_limit_forces_the_fence() -> None:
    s = session(PrecopyLimits(3, 0.001))
    precopy(s)
    slow = RoundSent(1, 10, 40960, 40960, 10.0, dirty_pages=10_000)
    assert one(s.handle(2, slow), SendRound).round == 2
    actions = s.handle(3, RoundSent(2, 10, 40960, 40960, 10.0, dirty_pages=10_000))
    assert one(actions, Fence) and s.phase is Phase.FENCED  # round 3 would be the last


def test_final_round_only_after_the_fence_is_confirmed() -> None:
    s = session()
    fenced(s)
    assert s.handle(1.05, RoundSent(1, 1, 1, 1, 1.0, 0)) == []  # stale report
    actions = s.handle(1.1, SourceFenced(b"R" * 32))
    r = one(actions, SendRound)
    assert r.final and r.round == 2 and s.phase is Phase.FINAL and s.root == b"R" * 32
    assert any(isinstance(a, SetTimer) and a.key == timer_key("m1", "fence") for a in actions)


def test_final_round_delivered_sends_root_and_waits_for_ledger() -> None:
    s = session()
    actions = verifying(s)
    msg = one(actions, Send).message
    assert msg == MigrationRoundDone("m1", 2, True, b"R" * 32)
    assert s.phase is Phase.VERIFYING and s.final_sent
    again = s.handle(5.0, TimerFired(timer_key("m1", "retransmit")))
    assert one(again, Send).message == msg


def test_commit_retires_the_source_copy() -> None:
    s = session()
    verifying(s)
    actions = s.handle(2.0, LedgerCommitted("m1", 4, b"R" * 32))
    assert one(actions, Retire).vm == "vm1"
    assert of(actions, Unfence) == []
    assert s.phase is Phase.COMMITTED and s.epoch == 4
    out = [a.detail for a in of(actions, Notify) if isinstance(a.detail, Outcome)][0]
    assert out.outcome == "committed" and out.fenced_seconds == pytest.approx(0.9)
    assert s.handle(2.1, LedgerCommitted("m1", 4, b"R" * 32)) == []


def test_commit_before_the_fence_still_fences_then_retires() -> None:
    s = session()
    precopy(s)
    actions = s.handle(0.5, LedgerCommitted("m1", 4, b"X" * 32))
    kinds = [type(a).__name__ for a in actions]
    assert kinds.index("CancelRound") < kinds.index("Fence") < kinds.index("Retire")
    assert s.phase is Phase.COMMITTED


@pytest.mark.parametrize("stage", [begun, precopy, fenced, final, verifying])
def test_abort_in_the_ledger_unfences(stage: Any) -> None:
    s = session()
    stage(s)
    actions = s.handle(9.0, LedgerAborted("m1"))
    assert one(actions, Unfence).migration_id == "m1"
    assert s.phase is Phase.ABORTED


@pytest.mark.parametrize("stage", [begun, precopy, fenced, final, verifying])
def test_target_down_past_the_grace_aborts(stage: Any) -> None:
    s = session()
    stage(s)
    t = one(s.handle(3.0, PeerDown("dc2")), SetTimer)
    assert t.at == 3.0 + PEER_DOWN_GRACE
    actions = s.handle(t.at, TimerFired(t.key))
    command = one(actions, SubmitLedger).command
    assert abort_of(command) == "m1"
    assert s.phase is Phase.ABORTING
    assert of(actions, Unfence) == [], "the fence holds until the ledger aborts"
    # the reason names the peer, its role, since when, and the kind of cause for the ledger
    since = datetime.datetime.fromtimestamp(3.0, datetime.UTC).strftime("%H:%M:%S")
    assert s.reason == f"target dc2 unreachable since {since} (link down for 30 s)"
    assert (command.reason, command.cause) == (s.reason, "peer")


def test_progress_moves_during_the_first_round() -> None:
    """Bytes, pages and the estimate move while round 1 runs (issue 16: the first round
    read 0 B and eta 0 until it jumped to 100 %)."""
    s = session()
    first = [a.detail for a in of(precopy(s), Notify) if isinstance(a.detail, Progress)][-1]
    assert (first.round, first.bytes_sent, first.pages) == (1, 0, 0)
    assert first.eta == math.inf, "no estimate before anything was measured"
    total = 1500 * 4096  # LAYOUT's pages
    seen = []
    for k in range(1, 5):  # a report every half second, as the rounds core sends them
        nbytes = k * total // 5
        actions = s.handle(0.2 + k * 0.5, TransferProgress(1, nbytes, nbytes // 4096,
                                                           nbytes // 2))
        seen.append([a.detail for a in of(actions, Notify)][-1])
        assert one(actions, SetTimer).key == timer_key("m1", "stall")
    assert [p.bytes_sent for p in seen] == [k * total // 5 for k in range(1, 5)]
    assert [p.pages for p in seen] == [k * total // 5 // 4096 for k in range(1, 5)]
    assert [p.wire_bytes for p in seen] == [k * total // 10 for k in range(1, 5)]
    # a fifth every half second: the rest takes (5 - k) halves of a second
    assert [round(p.eta, 6) for p in seen] == [2.0, 1.5, 1.0, 0.5]
    assert s.phase is Phase.PRECOPY and s.bytes_sent == 0, "the round's own tally waits"
    # the round's end takes over from its reports (no double count)
    s.handle(2.7, RoundSent(1, 1500, total, total // 2, 2.5, dirty_pages=400))
    assert s.moved_bytes == total and s.round_bytes == 0


def test_target_back_within_the_grace_cancels_the_timer() -> None:
    s = session()
    precopy(s)
    s.handle(3.0, PeerDown("dc2"))
    actions = s.handle(4.0, PeerUp("dc2"))
    assert actions and actions[0].key == timer_key("m1", "peer")
    assert s.handle(4.0, PeerDown("dc3")) == []


@pytest.mark.parametrize("stage", [precopy, fenced, final])
def test_stall_aborts(stage: Any) -> None:
    s = session()
    stage(s)
    actions = s.handle(100.0, TimerFired(timer_key("m1", "stall")))
    assert s.phase is Phase.ABORTING and "no progress" in s.reason
    assert abort_of(one(actions, SubmitLedger).command) == "m1"


def test_transfer_progress_pushes_the_stall_timer() -> None:
    s = session()
    precopy(s)
    t = one(s.handle(20.0, TransferProgress(1, 4096)), SetTimer)
    assert t.at == 20.0 + STALL_TIMEOUT
    assert s.handle(20.0, TransferProgress(7, 4096)) == []


def test_fenced_too_long_aborts() -> None:
    s = session()
    actions = final(s)
    t = [a for a in actions if isinstance(a, SetTimer) and a.key == timer_key("m1", "fence")][0]
    s.handle(t.at, TimerFired(t.key))
    assert s.phase is Phase.ABORTING and "fenced longer" in s.reason


@pytest.mark.parametrize("what", ["fence", "send round"])
def test_driver_failure_aborts(what: str) -> None:
    s = session()
    precopy(s)
    actions = s.handle(1.0, ActionFailed(what, "disk on fire"))
    assert s.phase is Phase.ABORTING and what in s.reason
    assert one(actions, CancelRound).migration_id == "m1"


def test_ledger_refusing_the_abort_keeps_waiting_for_its_word() -> None:
    s = session()
    precopy(s)
    s.handle(1.0, ActionFailed("send round", "x"))
    actions = s.handle(1.1, LedgerRefused(AbortMigration("m1"), "already committed"))
    assert [a.kind for a in actions] == ["migration.ledger-refused"]
    assert s.phase is Phase.ABORTING
    assert one(s.handle(2.0, LedgerCommitted("m1", 4, b"R")), Retire)


def test_abort_is_resubmitted_until_the_ledger_answers() -> None:
    s = session()
    precopy(s)
    s.handle(1.0, ActionFailed("send round", "x"))
    again = s.handle(11.0, TimerFired(timer_key("m1", "ledger")))
    assert abort_of(one(again, SubmitLedger).command) == "m1"


def test_cancel_before_the_begin_is_acted_on_when_it_lands() -> None:
    s = session()
    s.start(0.0)
    s.handle(0.05, CancelRequested("operator cancelled"))
    actions = s.handle(0.1, LedgerBegun("m1", 3))
    assert abort_of(one(actions, SubmitLedger).command) == "m1"
    assert of(actions, Send) == []


def test_rollback_policy_falls_back_to_v1_for_the_next_round() -> None:
    s = session()
    precopy(s)
    s.handle(0.5, PolicyChanged(SetPolicy(100, (), (), True)))
    r = one(s.handle(1.0, RoundSent(1, 10, 1_000, 1_000, 1.0, 100_000)), SendRound)
    assert r.version == 1


def test_no_version_without_rollout_is_v1() -> None:
    s = session(policy=SetPolicy(0, (), (), False))
    assert s.version == 1


def test_foreign_ledger_event_is_a_driver_bug() -> None:
    s = session()
    s.start(0.0)
    with pytest.raises(MigrationError, match="other"):
        s.handle(0.1, LedgerBegun("other", 3))
    with pytest.raises(MigrationError, match="foreign timer"):
        s.handle(0.1, TimerFired(("migration", "other", "stall")))


def test_message_about_another_migration_is_a_routing_bug() -> None:
    s = session()
    begun(s)
    with pytest.raises(MigrationError, match="about 'm2'"):
        s.handle(0.2, Received("dc2", MigrationReady("m2")))


def test_fence_waits_as_long_as_hashing_the_images_takes() -> None:
    big = (("memory", 64 * 1024 * 1024),)  # 256 GiB: ~180 s of hashing at VERIFY_RATE
    s = SourceSession.plan("dc1", "m1", "vm1", "dc2", 3, big, DC_LIMITS, V3_ALL, (1, 3), (1, 3),
                           AUTH)
    precopy(s)
    actions = s.handle(1.0, RoundSent(1, 10, 40960, 40960, 1.0, dirty_pages=0))
    stall = [a for a in actions if isinstance(a, SetTimer) and a.key == timer_key("m1", "stall")]
    assert one(actions, Fence) and stall[0].at - 1.0 > 4 * 180
