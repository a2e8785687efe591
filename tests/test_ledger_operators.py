"""Operator requests in the ledger: freshness in ledger time, replay and the first
outcome, the query by request id, bounded memory, deletion, and the migration
deadline (issue 15 item 3, issue 16 item 3)."""

from __future__ import annotations

import pytest

import consensus.operator_requests as requests_module
from consensus.authz import FRESHNESS_WINDOW
from consensus.ledger import (
    MIGRATION_DEADLINE,
    AbortMigration,
    ChangePolicy,
    ImportVm,
    Ledger,
    RegisterVm,
    SetPolicy,
)
from consensus.operator_requests import RETENTION
from mesh import wire
from sim.hosts.operators import SIM_OPERATORS
from tests.harness.ledger import DCS, LedgerDriver


def test_a_federation_without_operators_refuses_every_operator_command() -> None:
    d = LedgerDriver(Ledger(DCS))
    res = d.register("vm1", "dc-a")
    assert not res.ok and "operator 'ops' is not in federation ''" in res.error
    assert d.ledger.vms == {}


def test_ledger_time_follows_operator_requests_and_never_goes_back() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    t = d.ledger.clock
    assert t == d.clock
    late = d.auth(ImportVm("vm2", "dc-a", "/m"), at=t - 100.0)  # an operator a bit behind
    assert d.run("dc-a", RegisterVm("vm2", "dc-a", late)).ok
    assert d.ledger.clock == t
    stale = d.auth(ImportVm("vm3", "dc-a", "/m"), at=t - FRESHNESS_WINDOW - 1)
    res = d.run("dc-a", RegisterVm("vm3", "dc-a", stale))
    assert not res.ok and "requests older than 300 s are refused" in res.error
    assert "vm3" not in d.ledger.vms
    # an expired request is not remembered: its id stays unknown
    assert d.ledger.request_status("ops", last_nonce(d)).state == "unknown"


def last_nonce(d: LedgerDriver, who: str = "ops") -> str:
    """The request id of operator ``who``'s last request."""
    return f"t-{who}-{d.signers[who].count:08d}"


def test_a_trusted_time_bounds_both_ways() -> None:
    d = LedgerDriver()
    now = 5_000.0
    ahead = d.auth(SetPolicy(1, (), (), False), who="admin", at=now + FRESHNESS_WINDOW + 1)
    res = d.run("dc-a", ChangePolicy(ahead), now=now)
    assert not res.ok and "after 5000.000 (clock skew over 300 s)" in res.error
    ok = d.auth(SetPolicy(2, (), (), False), who="admin", at=now + 10)
    assert d.run("dc-a", ChangePolicy(ok), now=now).ok
    assert d.ledger.clock == now  # a trusted time is not moved by request timestamps
    assert d.ledger.policy.v3_percent == 2


def test_resubmitting_a_request_returns_its_first_outcome_and_applies_once() -> None:
    d = LedgerDriver()
    first = RegisterVm("vm1", "dc-a", d.auth(ImportVm("vm1", "dc-a", "/m")))
    assert d.run("dc-a", first).ok
    assert d.run("dc-a", first).ok  # the first outcome, not "already registered"
    assert d.ledger.epoch("vm1") == 0 and len(d.ledger.requests) == 1
    refused = RegisterVm("vm1", "dc-a", d.auth(ImportVm("vm1", "dc-a", "/other")))
    once = d.run("dc-a", refused)
    assert not once.ok and "already registered" in once.error
    assert d.run("dc-a", refused) == once


def test_the_query_by_request_id_tells_committed_refused_unknown() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    ok_id = last_nonce(d)
    d.register("vm1", "dc-b")
    refused_id = last_nonce(d)
    done = d.ledger.request_status("ops", ok_id)
    assert (done.state, done.command, done.subject) == ("committed", "operator.import-vm", "vm1")
    no = d.ledger.request_status("ops", refused_id)
    assert no.state == "refused" and "already registered" in no.error
    assert d.ledger.request_status("ops", "t-ops-99999999").state == "unknown"
    assert d.ledger.request_status("admin", ok_id).state == "unknown"  # per operator
    # the outcomes survive a snapshot
    again = Ledger.restore(DCS, d.ledger.snapshot(), SIM_OPERATORS)
    assert again.request_status("ops", ok_id) == done


def test_outcomes_are_forgotten_after_the_retention_in_ledger_time() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    first = last_nonce(d)
    d.clock += RETENTION + 1
    d.register("vm2", "dc-a")
    assert d.ledger.request_status("ops", first).state == "unknown"
    assert len(d.ledger.requests) == 1
    assert d.ledger.snapshot() == wire.encode(d.ledger.snapshot_message())


def test_a_full_book_forgets_only_expired_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests_module, "MAX_REMEMBERED", 3)
    d = LedgerDriver()
    for i in range(3):
        assert d.register(f"vm{i}", "dc-a").ok
    res = d.register("vm3", "dc-a")
    assert not res.ok and "3 operator requests within the last 300 s" in res.error
    d.clock += FRESHNESS_WINDOW + 2
    assert d.register("vm4", "dc-a").ok
    assert len(d.ledger.requests) == 3
    assert d.ledger.snapshot() == wire.encode(d.ledger.snapshot_message())


def test_delete_a_vm_and_clean_up_a_stuck_import() -> None:
    d = LedgerDriver()
    led = d.ledger
    d.register("stuck", "dc-a")  # registered, never started by its owner
    assert d.delete("stuck", client="dc-d").ok
    assert led.owner("stuck") is None and led.deleted == {"stuck": 0}
    assert "not registered" in d.delete("stuck").error
    # the name can be imported again; its epochs keep growing
    d.register("vm1", "dc-a")
    d.migrate("vm1", "dc-a", "dc-b", "m1")
    assert "migrating" not in d.delete("vm1").error
    res = d.register("vm1", "dc-c")
    assert res.ok and res.epoch == 2 and led.deleted == {"stuck": 0}
    again = d.register("stuck", "dc-b")
    assert again.ok and again.epoch == 1 and led.deleted == {}


def test_delete_refuses_a_vm_in_flight_and_needs_an_operator() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    res = d.delete("vm1")
    assert not res.ok and "is migrating (m1); cancel it first" in res.error
    assert "has role viewer" in d.delete("vm1", who="watcher").error
    assert d.abort("m1", "dc-c", who="ops").ok  # an operator's cancel, through any DC
    assert d.delete("vm1").ok


def test_the_target_may_abort_once_the_deadline_passed_in_ledger_time() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    deadline = d.ledger.migrations["m1"].deadline
    assert deadline == d.ledger.clock + MIGRATION_DEADLINE
    assert "only by timeout" in d.abort("m1", "dc-b").error
    # an operator request elsewhere moves the clock past the deadline
    d.clock = deadline
    d.register("vm2", "dc-c")
    assert d.abort("m1", "dc-b").ok
    assert d.ledger.migrations["m1"].state == "aborted" and d.ledger.owner("vm1") == "dc-a"


def test_a_trusted_time_passes_the_deadline_without_operator_requests() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    deadline = d.ledger.migrations["m1"].deadline
    assert not d.run("dc-b", AbortMigration("m1"), now=deadline - 1.0).ok
    assert d.run("dc-b", AbortMigration("m1"), now=deadline).ok
    assert d.ledger.migrations["m1"].state == "aborted"


def test_a_request_refused_for_its_role_changes_nothing_not_even_the_clock() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    clock, book = d.ledger.clock, len(d.ledger.requests)
    ahead = d.auth(SetPolicy(100, (), (), True), who="watcher", at=clock + 10_000.0)
    res = d.run("dc-c", ChangePolicy(ahead))
    assert not res.ok and "has role viewer; this needs admin" in res.error
    assert (d.ledger.clock, len(d.ledger.requests)) == (clock, book)
    assert d.ledger.request_status("watcher", last_nonce(d, "watcher")).state == "unknown"
