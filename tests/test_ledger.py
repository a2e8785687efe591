"""The ledger state machine: rules, invariants, exactly-once, snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import consensus.ledger as ledger_module
from consensus.authz import Authorization
from consensus.ledger import (
    CLIENT_WINDOW,
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    CancelMigration,
    ChangePolicy,
    CommitMigration,
    DeleteVm,
    ImportVm,
    Ledger,
    LedgerInvariantError,
    MigrateVm,
    RegisterVm,
    SetPolicy,
    UnregisterVm,
    VmRecord,
    v3_allowed,
)
from mesh import wire
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner
from tests.harness.ledger import DCS, ROOT, LedgerDriver


def test_register_begin_announce_commit_moves_ownership_and_bumps_epoch() -> None:
    d = LedgerDriver()
    led = d.ledger
    assert d.register("vm1", "dc-a").ok
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-a", 0)
    assert d.begin("vm1", "dc-a", "dc-b", "m1").ok
    assert led.owner("vm1") == "dc-a"  # ownership stays at the source until commit
    assert d.announce("m1").ok
    assert led.migrations["m1"].announced == ROOT
    res = d.commit("m1")
    assert res.ok and res.epoch == 1
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-b", 1)
    assert led.migrations["m1"].state == "committed" and led.migrations["m1"].root == ROOT


def test_a_repeated_begin_returns_the_first_outcome_and_changes_nothing() -> None:
    # A source restored after a crash resubmits its begin (the same command) as a new
    # PBFT request: the operator's request id has an outcome already.
    d = LedgerDriver()
    led = d.ledger
    d.register("vm1", "dc-a")
    begin = BeginMigration("vm1", "dc-a", "dc-b", 0, "m1", d.auth(MigrateVm("vm1", "dc-b")))
    assert d.run("dc-a", begin).ok
    before = (dict(led.vms), dict(led.migrations))
    assert d.run("dc-a", begin).ok
    assert (dict(led.vms), dict(led.migrations)) == before
    other = d.begin("vm1", "dc-a", "dc-c", "m2")
    assert not other.ok and "in progress" in other.error


def test_abort_keeps_ownership_at_source() -> None:
    d = LedgerDriver()
    led = d.ledger
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    assert d.abort("m1", "dc-a").ok
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-a", 0)
    assert not d.commit("m1").ok  # only from BEGUN
    assert d.begin("vm1", "dc-a", "dc-c", "m2").ok


def test_announce_is_the_sources_once() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    assert "only 'dc-a', the source" in d.announce("m1", client="dc-b").error
    assert "carries the root" in d.announce("m1", b"").error
    assert d.announce("m1").ok
    assert d.announce("m1").ok  # the same statement again
    assert "another root" in d.announce("m1", b"\x02" * 32).error
    assert d.ledger.migrations["m1"].announced == ROOT


@pytest.mark.parametrize(
    ("client", "kind", "why"),
    [
        ("dc-b", "register-other", "only 'dc-a', the DC the operator named"),
        ("dc-a", "register-again", "already registered"),
        ("dc-c", "begin-not-owner", "only its owner begins"),
        ("dc-a", "begin-stale", "stale epoch"),
        ("dc-a", "begin-self", "not another member"),
        ("dc-a", "begin-unknown", "not registered"),
        ("dc-b", "commit-ghost", "no migration"),
    ],
)
def test_rejected_commands_change_nothing(client: str, kind: str, why: str) -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    commands = {
        "register-other": RegisterVm("vm2", "dc-a", d.auth(ImportVm("vm2", "dc-a", "/m"))),
        "register-again": RegisterVm("vm1", "dc-a", d.auth(ImportVm("vm1", "dc-a", "/m"))),
        "begin-not-owner": BeginMigration("vm1", "dc-c", "dc-b", 0, "x",
                                          d.auth(MigrateVm("vm1", "dc-b"))),
        "begin-stale": BeginMigration("vm1", "dc-a", "dc-b", 7, "x",
                                      d.auth(MigrateVm("vm1", "dc-b"))),
        "begin-self": BeginMigration("vm1", "dc-a", "dc-a", 0, "x",
                                     d.auth(MigrateVm("vm1", "dc-a"))),
        "begin-unknown": BeginMigration("nope", "dc-a", "dc-b", 0, "x",
                                        d.auth(MigrateVm("nope", "dc-b"))),
        "commit-ghost": CommitMigration("ghost", ROOT),
    }
    vms, migrations = dict(d.ledger.vms), dict(d.ledger.migrations)
    res = d.run(client, commands[kind])
    assert not res.ok and why in res.error
    assert d.ledger.vms == vms and d.ledger.migrations == migrations


def test_commit_needs_the_target_and_the_root_the_source_announced() -> None:
    d = LedgerDriver()
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    assert "in progress" in d.begin("vm1", "dc-a", "dc-c", "m2").error
    assert "not announced" in d.commit("m1").error
    d.announce("m1")
    assert "only 'dc-b', the target" in d.commit("m1", client="dc-a").error
    assert "not the root the source announced" in d.commit("m1", b"\x02" * 32).error
    assert "no migration" in d.commit("m2", client="dc-b").error
    assert d.commit("m1").ok
    reused = d.begin("vm1", "dc-b", "dc-a", "m1")
    assert "used before" in reused.error


def test_exactly_once_per_client_and_request_id() -> None:
    d = LedgerDriver()
    led = d.ledger
    reg = RegisterVm("vm1", "dc-a", d.auth(ImportVm("vm1", "dc-a", "/m")))
    other = RegisterVm("vm-other", "dc-a", d.auth(ImportVm("vm-other", "dc-a", "/m")))
    first = led.execute("dc-a", 5, wire.encode(reg))
    again = led.execute("dc-a", 5, wire.encode(other))
    assert again == first and "vm-other" not in led.vms
    # another client's id 5 is a different request
    reg2 = RegisterVm("vm2", "dc-b", d.auth(ImportVm("vm2", "dc-b", "/m")))
    assert wire.decode(led.execute("dc-b", 5, wire.encode(reg2))).ok


def test_ids_older_than_the_window_are_refused() -> None:
    d = LedgerDriver()
    led = d.ledger
    d.register("vm1", "dc-a")
    d.begin("vm1", "dc-a", "dc-b", "m1")
    announce = wire.encode(AnnounceRoot("m1", ROOT))
    for rid in range(1, CLIENT_WINDOW + 3):
        led.execute("dc-a", 100 + rid, announce)
    assert led.executed_result("dc-a", 101) is not None
    late = RegisterVm("late", "dc-a", d.auth(ImportVm("late", "dc-a", "/m")))
    res = wire.decode(led.execute("dc-a", 100, wire.encode(late)))
    assert not res.ok and "window" in res.error and "late" not in led.vms


def test_policy_and_rollout_choice() -> None:
    d = LedgerDriver()
    led = d.ledger
    assert d.policy(SetPolicy(100, ("dc-b",), ("vm9",), False)).ok
    assert v3_allowed(led.policy, "anything", "dc-a", "dc-d")
    d.policy(SetPolicy(0, ("dc-b",), ("vm9",), False))
    assert v3_allowed(led.policy, "vm9", "dc-a", "dc-d")
    assert v3_allowed(led.policy, "x", "dc-a", "dc-b")
    assert not v3_allowed(led.policy, "x", "dc-a", "dc-d")
    d.policy(SetPolicy(100, ("dc-b",), ("vm9",), True))
    assert not v3_allowed(led.policy, "vm9", "dc-a", "dc-b")  # the kill switch wins


def test_malformed_command_is_a_rejection_not_an_exception() -> None:
    led = Ledger(DCS, SIM_OPERATORS)
    res = wire.decode(led.execute("dc-a", 1, b"\xff\x00garbage"))
    assert not res.ok and "malformed" in res.error


def test_invariant_violation_is_raised() -> None:
    d = LedgerDriver()
    led = d.ledger
    d.register("vm1", "dc-a")
    d.register("vm1b", "dc-a")
    led.vms["vm1"] = led.vms["vm1"].__class__("vm1", "dc-a", 0, "ghost")
    with pytest.raises(LedgerInvariantError):
        led.check_invariants()
    d2 = LedgerDriver()
    d2.register("vm1", "dc-a")
    d2.migrate("vm1", "dc-a", "dc-b", "m1")
    led2 = d2.ledger
    led2.vms["vm1"] = led2.vms["vm1"].__class__("vm1", "dc-b", 0, None)  # epoch went back
    with pytest.raises(LedgerInvariantError):
        led2.check_invariants()
    d3 = LedgerDriver()
    d3.register("vm1", "dc-a")
    d3.delete("vm1")
    d3.ledger.vms["vm1"] = VmRecord("vm1", "dc-a", 1, None)
    with pytest.raises(LedgerInvariantError):
        d3.ledger.check_invariants()  # registered and deleted at once


# --------------------------------------------------------------------------- properties

names = st.sampled_from(DCS)
vm_names = st.sampled_from(["vm1", "vm2", "vm3"])
mids = st.sampled_from(["m1", "m2", "m3", "m4"])
roots = st.sampled_from([b"", ROOT, b"\x02" * 32])
who = st.sampled_from(["admin", "ops", "watcher", "nobody"])
#: (kind, DC, VM, other DC, migration id, epoch, root, operator, seconds later, policy)
steps = st.tuples(
    st.sampled_from(["register", "begin", "announce", "commit", "abort", "cancel", "policy",
                     "delete", "replay"]),
    names, vm_names, names, mids, st.integers(0, 3), roots, who, st.integers(0, 400),
    st.builds(SetPolicy, st.integers(0, 100), st.lists(names, max_size=2),
              st.lists(vm_names, max_size=2), st.booleans()),
)


def _commands(seq: list[tuple]) -> list[tuple[str, bytes]]:  # type: ignore[type-arg]
    """The steps as (client, encoded command), signed once (both replicas get the bytes)."""
    signers = {name: OperatorSigner(name if name != "nobody" else "admin", prefix=name)
               for name in ("admin", "ops", "watcher", "nobody")}
    clock = 1000.0
    out: list[tuple[str, bytes]] = []
    for kind, dc, vm, other, mid, epoch, root, op, later, policy in seq:
        clock += later

        def auth(intent: object, op: str = op, at: float = clock) -> Authorization:
            return signers[op].authorize(intent, at)

        cmd: object
        if kind == "replay" and out:
            out.append((dc, out[-1][1]))
            continue
        if kind == "register":
            cmd = RegisterVm(vm, other, auth(ImportVm(vm, other, "/m")))
        elif kind == "begin":
            cmd = BeginMigration(vm, dc, other, epoch, mid, auth(MigrateVm(vm, other)))
        elif kind == "announce":
            cmd = AnnounceRoot(mid, root)
        elif kind == "commit":
            cmd = CommitMigration(mid, root)
        elif kind in ("abort", "cancel"):
            cmd = AbortMigration(mid, auth(CancelMigration(mid)) if kind == "cancel" else None)
        elif kind == "policy":
            cmd = ChangePolicy(auth(policy))
        else:
            cmd = UnregisterVm(vm, auth(DeleteVm(vm)))
        out.append((dc, wire.encode(cmd)))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(steps, max_size=50))
def test_any_command_sequence_keeps_invariants_and_replicas_agree(seq: list[tuple]) -> None:  # type: ignore[type-arg]
    a, b = Ledger(DCS, SIM_OPERATORS), Ledger(reversed(DCS), SIM_OPERATORS)
    epochs: dict[str, int] = {}
    for rid, (client, cmd) in enumerate(_commands(seq), start=1):
        ra = a.execute(client, rid, cmd)
        rb = b.execute(client, rid, cmd)
        assert ra == rb
        a.check_invariants()  # the full check agrees with the per-command one
        for vm, rec in a.vms.items():
            assert rec.epoch >= epochs.get(vm, 0)
            epochs[vm] = rec.epoch
    assert a.snapshot() == b.snapshot() and a.state_digest() == b.state_digest()
    restored = Ledger.restore(DCS, a.snapshot(), SIM_OPERATORS)
    assert restored.snapshot() == a.snapshot()


@settings(max_examples=60, deadline=None)
@given(st.lists(steps, max_size=40))
def test_snapshot_from_cached_records_is_the_wire_encoding_of_the_state(seq: list[tuple]) -> None:  # type: ignore[type-arg]
    """The snapshot is assembled from per-record encodings kept between snapshots
    (consensus.ledger_encoding); after any commands it is byte for byte the generic
    wire encoding of the whole state."""
    led = Ledger(DCS, SIM_OPERATORS)
    for i, (client, cmd) in enumerate(_commands(seq)):
        led.execute(client, i + 1, cmd)
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
    d = LedgerDriver()
    led = d.ledger
    led.snapshot()  # the encoder mirrors the state from here on
    for rid in range(1, 12):
        d.register(f"vm{rid}", DCS[0])
        if rid % 5 == 0:
            assert led.snapshot() == wire.encode(led.snapshot_message())
    d.delete("vm3")
    assert led.snapshot() == wire.encode(led.snapshot_message())
    again = LedgerDriver(Ledger.restore(DCS, led.snapshot(), SIM_OPERATORS))
    again.rids, again.clock = dict(d.rids), d.clock
    last = RegisterVm("vm12", DCS[0], d.auth(ImportVm("vm12", DCS[0], "/m")))
    assert again.run(DCS[0], last) == d.run(DCS[0], last)
    assert again.ledger.snapshot() == led.snapshot() == wire.encode(led.snapshot_message())


@given(st.binary(max_size=300))
def test_restore_refuses_garbage_with_wire_error(data: bytes) -> None:
    try:
        Ledger.restore(DCS, data)
    except (wire.WireError, LedgerInvariantError):
        pass
