"""The ledger state machine: rules, invariants, exactly-once, snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import consensus.ledger as ledger_module
from consensus.ledger import (
    CLIENT_WINDOW,
    AbortMigration,
    BeginMigration,
    CommitMigration,
    Ledger,
    LedgerInvariantError,
    LedgerResult,
    RegisterVm,
    SetPolicy,
    v3_allowed,
)
from mesh import wire

DCS = ("dc-a", "dc-b", "dc-c", "dc-d")


def run(ledger: Ledger, client: str, rid: int, cmd: object) -> LedgerResult:
    return wire.decode(ledger.execute(client, rid, wire.encode(cmd)), expect=(LedgerResult,))


def test_register_begin_commit_moves_ownership_and_bumps_epoch() -> None:
    led = Ledger(DCS)
    assert run(led, "dc-a", 1, RegisterVm("vm1", "dc-a")).ok
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-a", 0)
    assert run(led, "dc-a", 2, BeginMigration("vm1", "dc-a", "dc-b", 0, "m1")).ok
    assert led.owner("vm1") == "dc-a"  # ownership stays at the source until commit
    res = run(led, "dc-b", 1, CommitMigration("m1", b"\x01" * 32))
    assert res.ok and res.epoch == 1
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-b", 1)
    assert led.migrations["m1"].state == "committed"


def test_a_repeated_begin_is_idempotent_by_migration_id() -> None:
    # A source restored after a crash resubmits its begin as a new request.
    led = Ledger(DCS)
    run(led, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    begin = BeginMigration("vm1", "dc-a", "dc-b", 0, "m1")
    assert run(led, "dc-a", 2, begin).ok
    before = (dict(led.vms), dict(led.migrations))
    assert run(led, "dc-a", 3, begin).ok
    assert (dict(led.vms), dict(led.migrations)) == before
    other = run(led, "dc-a", 4, BeginMigration("vm1", "dc-a", "dc-c", 0, "m2"))
    assert not other.ok and "in progress" in other.error


def test_abort_keeps_ownership_at_source() -> None:
    led = Ledger(DCS)
    run(led, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    run(led, "dc-a", 2, BeginMigration("vm1", "dc-a", "dc-b", 0, "m1"))
    assert run(led, "dc-b", 1, AbortMigration("m1")).ok
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-a", 0)
    assert not run(led, "dc-b", 2, CommitMigration("m1", b"r")).ok  # only from BEGUN
    assert run(led, "dc-a", 3, BeginMigration("vm1", "dc-a", "dc-c", 0, "m2")).ok


@pytest.mark.parametrize(
    ("client", "cmd", "why"),
    [
        ("dc-b", RegisterVm("vm2", "dc-a"), "only the owner"),
        ("dc-a", RegisterVm("vm1", "dc-a"), "already registered"),
        ("dc-a", RegisterVm("vm9", "nobody"), "not a member"),
        ("dc-c", BeginMigration("vm1", "dc-a", "dc-b", 0, "x"), "source or the target"),
        ("dc-b", BeginMigration("vm1", "dc-b", "dc-c", 0, "x"), "owned by"),
        ("dc-a", BeginMigration("vm1", "dc-a", "dc-b", 7, "x"), "stale epoch"),
        ("dc-a", BeginMigration("vm1", "dc-a", "dc-a", 0, "x"), "not another member"),
        ("dc-a", BeginMigration("nope", "dc-a", "dc-b", 0, "x"), "not registered"),
        ("dc-a", CommitMigration("ghost", b"r"), "no migration"),
    ],
)
def test_rejected_commands_change_nothing(client: str, cmd: object, why: str) -> None:
    led = Ledger(DCS)
    run(led, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    before = led.snapshot()
    res = run(led, client, 99, cmd)
    assert not res.ok and why in res.error
    # only the client table (the remembered result) changed
    led2 = Ledger(DCS)
    run(led2, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    assert led.vms == led2.vms and led.migrations == led2.migrations
    assert before != led.snapshot()


def test_commit_needs_matching_id_target_and_root() -> None:
    led = Ledger(DCS)
    run(led, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    run(led, "dc-a", 2, BeginMigration("vm1", "dc-a", "dc-b", 0, "m1"))
    second = BeginMigration("vm1", "dc-a", "dc-c", 0, "m2")
    assert "in progress" in run(led, "dc-a", 3, second).error
    assert not run(led, "dc-a", 4, CommitMigration("m1", b"r")).ok  # the source may not commit
    assert not run(led, "dc-b", 5, CommitMigration("m1", b"")).ok  # a commit carries the root
    assert not run(led, "dc-b", 6, CommitMigration("m2", b"r")).ok
    assert run(led, "dc-b", 7, CommitMigration("m1", b"r")).ok
    reused = BeginMigration("vm1", "dc-b", "dc-a", 1, "m1")
    assert "used before" in run(led, "dc-b", 8, reused).error


def test_exactly_once_per_client_and_request_id() -> None:
    led = Ledger(DCS)
    first = led.execute("dc-a", 5, wire.encode(RegisterVm("vm1", "dc-a")))
    again = led.execute("dc-a", 5, wire.encode(RegisterVm("vm-other", "dc-a")))
    assert again == first and "vm-other" not in led.vms
    # another client's id 5 is a different request
    assert run(led, "dc-b", 5, RegisterVm("vm2", "dc-b")).ok


def test_ids_older_than_the_window_are_refused() -> None:
    led = Ledger(DCS)
    for rid in range(1, CLIENT_WINDOW + 3):
        led.execute("dc-a", rid, wire.encode(SetPolicy(rid % 101, (), (), False)))
    assert led.executed_result("dc-a", 1) is not None
    res = wire.decode(led.execute("dc-a", 1, wire.encode(RegisterVm("late", "dc-a"))))
    assert not res.ok and "window" in res.error and "late" not in led.vms


def test_policy_and_rollout_choice() -> None:
    led = Ledger(DCS)
    assert run(led, "dc-c", 1, SetPolicy(100, ("dc-b",), ("vm9",), False)).ok
    assert v3_allowed(led.policy, "anything", "dc-a", "dc-d")
    run(led, "dc-c", 2, SetPolicy(0, ("dc-b",), ("vm9",), False))
    assert v3_allowed(led.policy, "vm9", "dc-a", "dc-d")
    assert v3_allowed(led.policy, "x", "dc-a", "dc-b")
    assert not v3_allowed(led.policy, "x", "dc-a", "dc-d")
    run(led, "dc-c", 3, SetPolicy(100, ("dc-b",), ("vm9",), True))
    assert not v3_allowed(led.policy, "vm9", "dc-a", "dc-b")  # the kill switch wins


def test_malformed_command_is_a_rejection_not_an_exception() -> None:
    led = Ledger(DCS)
    res = wire.decode(led.execute("dc-a", 1, b"\xff\x00garbage"))
    assert not res.ok and "malformed" in res.error


def test_invariant_violation_is_raised() -> None:
    led = Ledger(DCS)
    run(led, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    run(led, "dc-a", 2, RegisterVm("vm1b", "dc-a"))
    led.vms["vm1"] = led.vms["vm1"].__class__("vm1", "dc-a", 0, "ghost")
    with pytest.raises(LedgerInvariantError):
        led.check_invariants()
    led2 = Ledger(DCS)
    run(led2, "dc-a", 1, RegisterVm("vm1", "dc-a"))
    run(led2, "dc-a", 2, BeginMigration("vm1", "dc-a", "dc-b", 0, "m1"))
    run(led2, "dc-b", 1, CommitMigration("m1", b"r"))
    led2.vms["vm1"] = led2.vms["vm1"].__class__("vm1", "dc-b", 0, None)  # epoch went back
    with pytest.raises(LedgerInvariantError):
        led2.check_invariants()


# --------------------------------------------------------------------------- properties

names = st.sampled_from(DCS)
vms = st.sampled_from(["vm1", "vm2", "vm3"])
mids = st.sampled_from(["m1", "m2", "m3", "m4"])
commands = st.one_of(
    st.builds(RegisterVm, vms, names),
    st.builds(BeginMigration, vms, names, names, st.integers(0, 3), mids),
    st.builds(CommitMigration, mids, st.binary(min_size=0, max_size=4)),
    st.builds(AbortMigration, mids),
    st.builds(SetPolicy, st.integers(0, 100), st.lists(names, max_size=2),
              st.lists(vms, max_size=2), st.booleans()),
)


@given(st.lists(st.tuples(names, st.integers(0, 40), commands), max_size=60))
def test_any_command_sequence_keeps_invariants_and_replicas_agree(
    seq: list[tuple[str, int, object]],
) -> None:
    a, b = Ledger(DCS), Ledger(reversed(DCS))
    epochs: dict[str, int] = {}
    for client, rid, cmd in seq:
        ra = a.execute(client, rid, wire.encode(cmd))
        rb = b.execute(client, rid, wire.encode(cmd))
        assert ra == rb
        a.check_invariants()  # the full check agrees with the per-command one
        for vm, rec in a.vms.items():
            assert rec.epoch >= epochs.get(vm, 0)
            epochs[vm] = rec.epoch
    assert a.snapshot() == b.snapshot() and a.state_digest() == b.state_digest()
    restored = Ledger.restore(DCS, a.snapshot())
    assert restored.snapshot() == a.snapshot()


@given(st.lists(st.tuples(names, st.integers(0, 40), commands), max_size=40))
def test_snapshot_from_cached_records_is_the_wire_encoding_of_the_state(
    seq: list[tuple[str, int, object]],
) -> None:
    """The snapshot is assembled from per-record encodings kept between snapshots
    (consensus.ledger_encoding); after any commands it is byte for byte the generic
    wire encoding of the whole state."""
    led = Ledger(DCS)
    for i, (client, rid, cmd) in enumerate(seq):
        led.execute(client, rid, wire.encode(cmd))
        if i % 3 == 0:  # between snapshots the encoder only hears of the changes
            assert led.snapshot() == wire.encode(led.snapshot_message())
    assert led.snapshot() == wire.encode(led.snapshot_message())
    assert wire.encode(wire.decode(led.snapshot())) == led.snapshot()


def test_snapshot_follows_evicted_results_and_a_restored_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Results leaving the exactly-once window leave the cached snapshot too, and a
    ledger restored from a snapshot encodes the same bytes."""
    monkeypatch.setattr(ledger_module, "CLIENT_WINDOW", 4)
    led = Ledger(DCS)
    led.snapshot()  # the encoder mirrors the state from here on
    for rid in range(1, 12):
        led.execute(DCS[0], rid, wire.encode(RegisterVm(f"vm{rid}", DCS[0])))
        if rid % 5 == 0:
            assert led.snapshot() == wire.encode(led.snapshot_message())
    assert led.snapshot() == wire.encode(led.snapshot_message())
    again = Ledger.restore(DCS, led.snapshot())
    again.execute(DCS[0], 12, wire.encode(RegisterVm("vm12", DCS[0])))
    led.execute(DCS[0], 12, wire.encode(RegisterVm("vm12", DCS[0])))
    assert again.snapshot() == led.snapshot() == wire.encode(led.snapshot_message())


@given(st.binary(max_size=300))
def test_restore_refuses_garbage_with_wire_error(data: bytes) -> None:
    try:
        Ledger.restore(DCS, data)
    except (wire.WireError, LedgerInvariantError):
        pass
