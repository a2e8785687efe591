"""A Byzantine DC holding a valid DC key, against the ledger (issue 15 item 3).

Every command here is what an insider DC can submit on its own: its PBFT requests
are signed by its own key, so every replica executes them. It may also have seen
every operator request that went through the federation (they travel in the
ordered batches) and it holds its own DC signing key. The ledger must refuse each
command that takes or changes what the DC does not own, leave the state as it
was, and count the refusal.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.authz import authorize
from consensus.ledger import (
    COMMAND_TYPES,
    AbortMigration,
    BeginMigration,
    CancelMigration,
    ChangePolicy,
    CommitMigration,
    DeleteVm,
    ImportVm,
    Ledger,
    MigrateVm,
    RegisterVm,
    SetPolicy,
    UnregisterVm,
)
from mesh import wire
from sim.hosts.operators import SIM_FEDERATION
from sim.hosts.pbft_cluster import identity_for
from tests.harness.ledger import DCS, ROOT, LedgerDriver
from tests.harness.wire_strategies import for_class

BAD = "dc-b"


def _federation() -> LedgerDriver:
    """dc-a owns vm1 (idle) and vm2 (migrating to dc-c, root announced)."""
    d = LedgerDriver()
    assert d.register("vm1", "dc-a").ok
    assert d.register("vm2", "dc-a").ok
    assert d.begin("vm2", "dc-a", "dc-c", "m-honest").ok
    assert d.announce("m-honest").ok
    return d


def _refused_and_unchanged(d: LedgerDriver, command: object, why: str) -> None:
    before = d.ledger.snapshot_message()
    refusals = sum(d.ledger.refusals.values())
    res = d.run(BAD, command)
    after = d.ledger.snapshot_message()
    assert not res.ok, f"{BAD} got {command!r} through"
    assert why in res.error, res.error
    assert (after.vms, after.migrations, after.policy, after.deleted) == (
        before.vms, before.migrations, before.policy, before.deleted)
    assert sum(d.ledger.refusals.values()) == refusals + 1


def test_a_target_cannot_begin_and_commit_on_its_own_to_take_a_vm() -> None:
    """The attack of issue 15: dc-b names itself the target of dc-a's VM, begins and
    commits with any root. Even holding an operator's genuine request to move vm1
    to dc-b, it may not begin (only the owner does), and without the source's
    announced root no commit is taken."""
    d = _federation()
    asked = d.auth(MigrateVm("vm1", BAD, "dc-a", 0))
    _refused_and_unchanged(d, BeginMigration("vm1", "dc-a", BAD, 0, "steal", asked),
                           "only its owner begins")
    # naming itself the source: the operator's request names dc-a (the binding of issue 15)
    _refused_and_unchanged(d, BeginMigration("vm1", BAD, BAD, 0, "steal", asked),
                           "source='dc-a', epoch=0, not vm='vm1', target='dc-b', source='dc-b'")
    own = d.auth(MigrateVm("vm1", BAD, BAD, 0))  # a request naming dc-b as the source
    _refused_and_unchanged(d, BeginMigration("vm1", BAD, BAD, 0, "steal", own),
                           "only its owner begins")
    later = d.auth(MigrateVm("vm1", BAD, "dc-a", 3))  # signed for another epoch
    _refused_and_unchanged(d, BeginMigration("vm1", "dc-a", BAD, 0, "steal", later),
                           "epoch=3, not")
    _refused_and_unchanged(d, CommitMigration("steal", b"\x00" * 32), "no migration")
    assert (d.ledger.owner("vm1"), d.ledger.epoch("vm1")) == ("dc-a", 0)


def test_no_dc_but_the_target_commits_and_only_with_the_announced_root() -> None:
    d = _federation()
    _refused_and_unchanged(d, CommitMigration("m-honest", ROOT), "only 'dc-c', the target")
    d2 = LedgerDriver()
    d2.register("vm1", "dc-a")
    d2.begin("vm1", "dc-a", BAD, "m1")  # the operator really moves vm1 to the insider
    _refused_and_unchanged(d2, CommitMigration("m1", ROOT), "not announced")
    d2.announce("m1")
    _refused_and_unchanged(d2, CommitMigration("m1", b"\x07" * 32), "not the root")
    assert d2.commit("m1").ok and d2.ledger.owner("vm1") == BAD  # the honest way still works


def test_a_third_dc_cannot_abort_and_a_target_only_by_timeout() -> None:
    d = _federation()
    _refused_and_unchanged(d, AbortMigration("m-honest"), "cancelling it takes an operator")
    res = d.run("dc-c", AbortMigration("m-honest"))
    assert not res.ok and "only by timeout" in res.error
    assert d.ledger.migrations["m-honest"].state == "begun"


def test_a_dc_cannot_import_delete_or_set_policy_without_an_operator() -> None:
    d = _federation()
    own_key = identity_for(BAD)  # the insider's DC key, not an operator's
    forged = authorize(own_key, SIM_FEDERATION, "admin", ImportVm("evil", BAD, "/m"), d.clock,
                       "forged-0001")
    _refused_and_unchanged(d, RegisterVm("evil", BAD, forged), "not operator 'admin'")
    as_itself = authorize(own_key, SIM_FEDERATION, BAD, SetPolicy(100, (), (), True), d.clock,
                          "forged-0002")
    _refused_and_unchanged(d, ChangePolicy(as_itself), f"operator '{BAD}' is not in")
    gone = authorize(own_key, SIM_FEDERATION, "ops", DeleteVm("vm1"), d.clock, "forged-0003")
    _refused_and_unchanged(d, UnregisterVm("vm1", gone), "not operator 'ops'")
    cancel = authorize(own_key, SIM_FEDERATION, "ops", CancelMigration("m-honest"), d.clock,
                       "forged-0004")
    _refused_and_unchanged(d, AbortMigration("m-honest", cancel), "not operator 'ops'")


def test_a_dc_cannot_reuse_an_operators_request_for_something_else() -> None:
    d = _federation()
    # what dc-a's operator asked: import vm3 at dc-a
    genuine = d.auth(ImportVm("vm3", "dc-a", "/m"))
    _refused_and_unchanged(d, RegisterVm("vm3", BAD, genuine),
                           "asked for vm='vm3', dc='dc-a', not vm='vm3', dc='dc-b'")
    _refused_and_unchanged(d, RegisterVm("vm3", "dc-a", genuine), "only 'dc-a'")
    # the operator's policy body, wrapped into another command
    _refused_and_unchanged(d, UnregisterVm("vm1", genuine), "needs operator.delete-vm")
    # an operator's cancel of one migration used on another
    d.begin("vm1", "dc-a", "dc-d", "m2")
    cancel = d.auth(CancelMigration("m2"))
    _refused_and_unchanged(d, AbortMigration("m-honest", cancel),
                           "asked for migration_id='m2', not migration_id='m-honest'")
    # a tampered body under a genuine signature
    tampered = type(genuine)(genuine.request, genuine.body[:-1] + b"x")
    _refused_and_unchanged(d, RegisterVm("vm3", "dc-a", tampered), "is not the one")


def test_roles_are_enforced_for_what_an_insider_relays() -> None:
    d = _federation()
    viewer = d.auth(SetPolicy(100, (), (), True), who="watcher")
    _refused_and_unchanged(d, ChangePolicy(viewer), "has role viewer; this needs admin")
    operator = d.auth(SetPolicy(100, (), (), True), who="ops")
    _refused_and_unchanged(d, ChangePolicy(operator), "has role operator; this needs admin")
    assert d.policy(SetPolicy(100, (), (), True), client=BAD).ok  # an admin's, relayed: fine


def test_replays_and_stale_requests_are_refused() -> None:
    d = _federation()
    old = d.auth(DeleteVm("vm1"), at=d.clock - 301.0)
    _refused_and_unchanged(d, UnregisterVm("vm1", old), "older than 300 s")
    d.policy(SetPolicy(30, (), (), False))
    reused = d.auth(SetPolicy(100, (), (), True), who="admin", nonce="t-admin-00000001")
    _refused_and_unchanged(d, ChangePolicy(reused), "already used by another request")


def test_every_replica_refuses_the_same_and_counts_it() -> None:
    """Two replicas executing the insider's commands agree on each refusal and on the
    state; their refusal counters agree too."""
    script = _federation()
    ledgers = [Ledger(DCS, script.ledger.operators) for _ in range(2)]
    sent: list[tuple[str, bytes]] = []

    def both(client: str, command: object) -> list[bytes]:
        raw = wire.encode(command)
        sent.append((client, raw))
        return [led.execute(client, len(sent), raw) for led in ledgers]

    both("dc-a", RegisterVm("vm1", "dc-a", script.auth(ImportVm("vm1", "dc-a", "/m"))))
    attacks = [
        BeginMigration("vm1", "dc-a", BAD, 0, "x", script.auth(MigrateVm("vm1", BAD, "dc-a", 0))),
        CommitMigration("x", ROOT),
        AbortMigration("x"),
        ChangePolicy(script.auth(SetPolicy(100, (), (), True), who="ops")),
    ]
    for attack in attacks:
        first, second = both(BAD, attack)
        assert first == second and not wire.decode(first).ok
    assert ledgers[0].state_digest() == ledgers[1].state_digest()
    assert ledgers[0].refusals == ledgers[1].refusals
    assert sum(ledgers[0].refusals.values()) == len(attacks)
    assert ledgers[0].owner("vm1") == "dc-a"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMMAND_TYPES).flatmap(for_class), st.sampled_from(DCS))
def test_any_command_a_dc_can_make_up_is_answered_and_changes_nothing_it_may_not(
    command: object, client: str,
) -> None:
    """Whatever well-formed command a DC invents (an operator's request it cannot sign
    included), the ledger answers with a result, keeps its invariants, and takes no
    operator command (no random bytes carry an operator's signature)."""
    d = _federation()
    before = d.ledger.snapshot_message()
    res = d.run(client, command)
    d.ledger.check_invariants()
    if getattr(command, "authorization", None) is not None:
        assert not res.ok
        after = d.ledger.snapshot_message()
        assert (after.vms, after.policy, after.deleted) == (before.vms, before.policy,
                                                           before.deleted)


def test_the_same_request_signed_again_gets_its_first_outcome_and_applies_once() -> None:
    """An operator whose answer was lost signs the same intent again under its request id:
    the ledger answers the first outcome and changes nothing (issue 16 item 3)."""
    d = _federation()
    first = d.auth(DeleteVm("vm1"), nonce="t-ops-again-001")
    assert d.run("dc-c", UnregisterVm("vm1", first)).ok
    assert d.register("vm1", "dc-a").ok  # a new vm1, epoch 1: a second delete would hit it
    again = d.auth(DeleteVm("vm1"), nonce="t-ops-again-001")  # signed later: other bytes
    assert again.request != first.request
    vms, deleted, requests = dict(d.ledger.vms), dict(d.ledger.deleted), len(d.ledger.requests)
    res = d.run("dc-c", UnregisterVm("vm1", again))
    assert res.ok and res.epoch == 0  # the first outcome (vm1 at epoch 0 deleted)
    assert (d.ledger.vms, d.ledger.deleted, len(d.ledger.requests)) == (vms, deleted, requests)
    assert d.ledger.owner("vm1") == "dc-a"
    assert d.ledger.request_status("ops", "t-ops-again-001").state == "committed"
