"""An operator's cancel in the sans-I/O source session: every phase, the restore of a
cancel made before the begin landed, and random interleavings with cancels (the
migration world of tests/harness/migration_world.py checks safety after every step)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import rule

from consensus.ledger import AbortMigration, BeginMigration, MigrationRecord, SetPolicy
from federation.migration.restore import restore
from federation.migration.source import SourceSession
from federation.migration.target import TargetSession
from federation.migration.vocabulary import (
    CANCEL_REASON,
    CancelRequested,
    CancelRound,
    Fence,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    MigrationReady,
    Outcome,
    Phase,
    PrecopyLimits,
    Retire,
    RoundSent,
    SourceFenced,
    SubmitLedger,
    Unfence,
    record_key,
)
from mesh.core import Notify, Persist, Received, Send
from tests.harness.ledger import AUTH
from tests.harness.migration_session import abort_of
from tests.harness.migration_world import MID, SRC, TGT, MigrationMachine, World

LAYOUT = (("memory", 1000), ("disk-0", 500))

#: the begin of session() (a v3 transfer: the policy gives v3 to every VM)
BEGIN = BeginMigration("vm1", "dc1", "dc2", 3, "m1", AUTH, 3)


def session() -> SourceSession:
    return SourceSession.plan("dc1", "m1", "vm1", "dc2", 3, LAYOUT, PrecopyLimits(5, 0.5),
                              SetPolicy(100, (), (), False), (1, 3), (1, 3), AUTH)


def of(actions: list[Any], cls: type) -> list[Any]:
    return [a for a in actions if isinstance(a, cls)]


def kinds(actions: list[Any]) -> list[str]:
    return [a.kind for a in of(actions, Notify)]


def to_phase(s: SourceSession, phase: Phase) -> None:
    """Drive ``s`` along the normal path until it is in ``phase``."""
    steps = [
        (Phase.BEGUN, LedgerBegun("m1", 3)),
        (Phase.PRECOPY, Received("dc2", MigrationReady("m1"))),
        (Phase.FENCED, RoundSent(1, 1500, 1500 * 4096, 1_000_000, 1.0, dirty_pages=1)),
        (Phase.FINAL, SourceFenced(b"R" * 32)),
        (Phase.VERIFYING, RoundSent(2, 1, 4096, 4096, 0.01, dirty_pages=0)),
    ]
    s.start(0.0)
    t = 0.0
    for reached, event in steps:
        if s.phase is phase:
            return
        t += 0.1
        s.handle(t, event)
        assert s.phase is reached
    assert s.phase is phase


def finish_abort(s: SourceSession) -> list[Any]:
    return s.handle(5.0, LedgerAborted("m1"))


@pytest.mark.parametrize("phase", [Phase.BEGUN, Phase.PRECOPY, Phase.FENCED, Phase.FINAL,
                                   Phase.VERIFYING])
def test_cancel_aborts_through_the_ledger_and_the_vm_resumes(phase: Phase) -> None:
    s = session()
    to_phase(s, phase)
    actions = s.handle(2.0, CancelRequested())
    assert s.phase is Phase.ABORTING and s.reason == CANCEL_REASON == "cancelled by operator"
    assert [abort_of(a.command) for a in of(actions, SubmitLedger)] == ["m1"]
    assert kinds(actions)[:2] == ["migration.cancel-requested", "migration.aborting"]
    assert of(actions, Unfence) == [], "the VM resumes only once the ledger has the abort"
    persisted = of(actions, Persist)
    assert persisted and persisted[0].key == record_key("m1"), "the decision is durable first"
    # a round in flight is stopped; before round 1 there is none to stop
    assert bool(of(actions, CancelRound)) == (s.round > 0)
    ended = finish_abort(s)
    assert of(ended, Unfence) == [Unfence("vm1", "m1")]
    outcome = next(a.detail for a in of(ended, Notify) if a.kind == "migration.done")
    assert isinstance(outcome, Outcome)
    assert (outcome.outcome, outcome.reason) == ("aborted", "cancelled by operator")


def test_cancel_before_the_begin_lands_waits_for_it_then_aborts() -> None:
    s = session()
    s.start(0.0)
    actions = s.handle(0.05, CancelRequested())
    assert s.phase is Phase.PLANNED and of(actions, SubmitLedger) == []
    assert of(actions, Persist), "the wish survives a restart"
    again = s.handle(0.06, CancelRequested())  # a second cancel changes nothing
    assert of(again, SubmitLedger) == []
    begun = s.handle(0.1, LedgerBegun("m1", 3))
    assert [abort_of(a.command) for a in of(begun, SubmitLedger)] == ["m1"]
    assert of(begun, Send) == [], "no offer goes to the target"
    ended = finish_abort(s)
    assert of(ended, Unfence) and s.phase is Phase.ABORTED and s.reason == CANCEL_REASON


@pytest.mark.parametrize("ledger", [None, "begun", "aborted"])
def test_a_cancel_before_the_begin_survives_a_restart(ledger: str | None) -> None:
    s = session()
    s.start(0.0)
    record = of(s.handle(0.05, CancelRequested()), Persist)[-1].value
    rec = None if ledger is None else MigrationRecord("m1", "vm1", "dc1", "dc2", 3, ledger, b"")
    rebuilt, actions = restore(record, rec, 1.0)
    assert isinstance(rebuilt, SourceSession)
    if ledger is None:  # the begin is submitted again; the wish is acted on when it lands
        assert [a.command for a in of(actions, SubmitLedger)] == [
            BEGIN]
        actions = rebuilt.handle(1.1, LedgerBegun("m1", 3))
    if ledger != "aborted":
        assert [abort_of(a.command) for a in of(actions, SubmitLedger)] == ["m1"]
        actions = rebuilt.handle(2.0, LedgerAborted("m1"))
    assert of(actions, Unfence) and rebuilt.phase is Phase.ABORTED
    assert rebuilt.reason == CANCEL_REASON


def test_the_targets_commit_can_win_after_the_final_round() -> None:
    s = session()
    to_phase(s, Phase.VERIFYING)
    s.handle(2.0, CancelRequested())
    refused = s.handle(2.1, LedgerRefused(AbortMigration("m1"),
                                          "migration 'm1' is already committed"))
    assert kinds(refused) == ["migration.ledger-refused"]
    ended = s.handle(2.2, LedgerCommitted("m1", 4, b"R" * 32))
    assert of(ended, Retire) and of(ended, Unfence) == [] and s.phase is Phase.COMMITTED


@pytest.mark.parametrize("end", ["committed", "aborted", "refused", "aborting"])
def test_cancel_is_refused_with_a_reason_once_decided(end: str) -> None:
    s = session()
    if end == "refused":
        s.start(0.0)
        s.handle(0.1, LedgerRefused(BEGIN, "stale"))
    else:
        to_phase(s, Phase.PRECOPY)
        if end == "committed":
            s.handle(1.0, LedgerCommitted("m1", 4, b""))
        else:
            s.handle(1.0, CancelRequested())
            if end == "aborted":
                finish_abort(s)
    why = s.cancel_refusal()
    assert end in why and "m1" in why
    before = s.record()
    assert s.handle(3.0, CancelRequested()) == [] and s.record() == before


def test_a_fresh_session_takes_a_cancel() -> None:
    s = session()
    assert s.cancel_refusal() == ""
    to_phase(s, Phase.FENCED)
    assert s.cancel_refusal() == ""
    assert of(s.handle(2.0, CancelRequested()), Fence) == []


# --------------------------------------------------------------------------- interleavings


class CancelMachine(MigrationMachine):
    """The migration interleavings, plus an operator's cancel at any moment."""

    cancelled_in: Phase | None = None

    @rule()
    def cancel(self) -> None:
        s = self.w.sessions[SRC]
        if not isinstance(s, SourceSession) or not self.w.up[SRC] or self.cancelled_in:
            return
        if not s.cancel_refusal():
            self.cancelled_in = s.phase
        self.w.feed(SRC, CancelRequested())

    def teardown(self) -> None:
        if not hasattr(self, "w"):
            return
        self.w.settle()
        if self.cancelled_in is None or self.w.mig_state() != "aborted":
            return
        src = self.w.sessions[SRC]
        assert src is not None and src.phase is Phase.ABORTED
        refused_begin = src.reason.startswith("ledger refused the begin")
        assert src.reason == CANCEL_REASON or (
            self.cancelled_in is Phase.PLANNED and refused_begin), src.reason
        assert self.w.src_running and self.w.ledger.owner("vm1") == SRC


_PROFILE = settings.default
assert _PROFILE is not None
# A quarter of the profile's examples: the cancel rule rides on MigrationMachine's
# interleavings, which tests/test_migration_stateful.py already runs at full count.
CancelMachine.TestCase.settings = settings(
    _PROFILE, stateful_step_count=40, max_examples=max(25, _PROFILE.max_examples // 4))
TestCancelInterleavings = CancelMachine.TestCase


def test_world_cancel_in_precopy_ends_with_the_vm_at_its_source() -> None:
    w = World(SetPolicy(100, (), (), False))
    for _ in range(200):
        s = w.sessions[SRC]
        if s is not None and s.phase is Phase.PRECOPY:
            break
        assert w.step_forward(time_passes=False)
    target = w.sessions[TGT]
    assert isinstance(target, TargetSession) and w.tgt_prepared
    w.feed(SRC, CancelRequested())
    w.settle()
    assert w.mig_state() == "aborted" and w.ledger.owner("vm1") == SRC and w.src_running
    assert not w.tgt_prepared and w.tgt_started is None, "the target discarded its copy"
    assert w.sessions[SRC].reason == CANCEL_REASON  # type: ignore[union-attr]
    assert w.ledger.migrations[MID].state == "aborted"



def test_world_an_offer_that_arrives_after_the_abort_is_prepared_then_discarded() -> None:
    """The source cancels while its offer is on the way; the abort is decided before
    the offer reaches the target, which has not heard of the abort yet: it prepares
    (it cannot know better), and discards when the abort reaches it."""
    w = World(SetPolicy(0, (), (), False))
    for _ in range(200):
        if any(type(m).__name__ == "MigrationOffer" for _, _, m in w.net):
            break
        assert w.step_forward(time_passes=False)
    offer = next(i for i, (_, _, m) in enumerate(w.net) if type(m).__name__ == "MigrationOffer")
    while w.cursor[TGT] < len(w.facts):  # the target has heard of the begin
        w.deliver_fact(TGT)
    assert isinstance(w.sessions[TGT], TargetSession)
    w.feed(SRC, CancelRequested())
    while w.ledger_queue:
        w.execute_next(0)
    assert w.mig_state() == "aborted" and not w.tgt_prepared
    w.deliver_message(offer)
    assert w.tgt_prepared  # the target's ledger has not told it yet
    w.settle()
    assert not w.tgt_prepared and w.tgt_started is None, "the target discarded its copy"
    assert w.ledger.owner("vm1") == SRC and w.src_running
