"""The rollout's targeting (regions, node-level exclusion) and the ledger's automatic
rollback to v1 (consensus.ledger_commands.rollout_after_end), on the ledger itself and
through PBFT in the simulator: every replica rolls back at the same entry."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.ledger import Ledger, SetPolicy, recorded_policy, v3_allowed
from federation.migration.rollout import choose_version, round_version
from federation.migration.vocabulary import CANCEL_REASON, abort_cause
from mesh import wire
from sim.hosts.operators import SIM_OPERATORS
from tests.harness.ledger import DCS, LedgerDriver

A, B, C, D = DCS
REGIONS = {A: "West Europe", B: "West Europe", C: "East US", D: "Japan East"}


def policy(**kw: object) -> SetPolicy:
    base = {"v3_percent": 0, "target_dcs": (), "target_vms": (), "kill_switch": False}
    return SetPolicy(**{**base, **kw})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- targeting


def test_a_target_region_gives_v3_from_or_to_its_dcs() -> None:
    p = policy(target_regions=("East US",))
    assert v3_allowed(p, "vm", A, C, REGIONS) and v3_allowed(p, "vm", C, D, REGIONS)
    assert not v3_allowed(p, "vm", A, B, REGIONS)
    assert not v3_allowed(p, "vm", A, C), "without the federation's regions no DC is in one"
    assert choose_version(p, "vm", A, C, (1, 3), (1, 3), REGIONS) == 3
    assert choose_version(p, "vm", A, B, (1, 3), (1, 3), REGIONS) == 1


@given(vm=st.text(min_size=1, max_size=20), pct=st.integers(0, 100))
def test_an_excluded_dc_never_gets_v3_whatever_else_says(vm: str, pct: int) -> None:
    p = policy(v3_percent=pct, target_dcs=(C,), target_vms=(vm,),
               target_regions=("East US", "West Europe"), excluded_dcs=(C,))
    assert not v3_allowed(p, vm, A, C, REGIONS) and not v3_allowed(p, vm, C, B, REGIONS)
    assert v3_allowed(p, vm, A, B, REGIONS)  # the rest of the policy still holds
    # a v3 transfer that learns of the exclusion mid-way sends its next rounds with v1
    assert round_version(3, (1, 3), p, vm, A, C, REGIONS) == 1


def test_the_ledger_records_the_admins_policy_and_its_own_counters_from_zero() -> None:
    asked = SetPolicy(20, (B, B), ("x",), False, ("East US",), (D,), 50, 4, 2,
                      v3_ended=9, v3_aborted=9, v3_verify_failures=9, rolled_back="forged")
    led = LedgerDriver()
    assert led.policy(asked).ok
    assert led.ledger.policy == recorded_policy(asked)
    got = led.ledger.policy
    assert (got.target_dcs, got.excluded_dcs, got.max_abort_percent, got.min_ended,
            got.max_verify_failures) == ((B,), (D,), 50, 4, 2)
    assert (got.v3_ended, got.v3_aborted, got.v3_verify_failures, got.rolled_back) == (
        0, 0, 0, ""), "an admin cannot write the ledger's bookkeeping"


# --------------------------------------------------------------------------- rollback


def _ledger(p: SetPolicy) -> LedgerDriver:
    led = LedgerDriver()
    assert led.policy(p).ok
    for i in range(12):
        assert led.register(f"vm{i}", A).ok
    return led


def _end(led: LedgerDriver, i: int, outcome: str, version: int = 3) -> None:
    mid = f"m{i}"
    assert led.begin(f"vm{i}", A, B, mid, version=version).ok
    if outcome == "commit":
        assert led.announce(mid).ok and led.commit(mid).ok
    elif outcome == "cancel":
        assert led.abort(mid, C, who="ops").ok
    elif outcome == "verification":
        reason = (f"the target {B} gave up: the root of the received images does not match "
                  "the root the source announced")
        assert abort_cause(reason) == "verification"
        assert led.abort(mid, A, reason=reason, cause="verification").ok
    else:
        reason = f"target {B} unreachable since 12:01:07 (link down for 30 s)"
        assert abort_cause(reason) == "peer"
        assert led.abort(mid, A, reason=reason, cause="peer").ok


def test_abort_rate_rolls_back_once_enough_v3_migrations_ended() -> None:
    led = _ledger(policy(v3_percent=100, max_abort_percent=50, min_ended=4))
    _end(led, 0, "peer")
    _end(led, 1, "peer")
    _end(led, 2, "peer", version=1)  # a v1 migration does not count
    assert not led.ledger.policy.rolled_back, "2 of 2 aborted, but min_ended is 4"
    _end(led, 3, "commit")
    p = led.ledger.policy
    assert (p.v3_ended, p.v3_aborted, p.kill_switch) == (3, 2, False)
    _end(led, 4, "commit")  # 2 of 4 = 50 %: the threshold
    p = led.ledger.policy
    assert p.kill_switch and p.rolled_back.startswith(
        "2 of 4 v3 migrations aborted (50 % >= max_abort_percent 50); the last was m4")
    assert not v3_allowed(p, "vm9", A, B), "rolled back: v1 for everyone"
    # the migration's record says why it aborted, at every replica
    rec = led.ledger.migrations["m0"]
    assert (rec.version, rec.cause) == (3, "peer") and "unreachable since" in rec.reason
    # more ends change nothing until an admin records a new policy, which starts afresh
    _end(led, 5, "peer")
    assert led.ledger.policy == p
    assert led.policy(policy(v3_percent=100, max_abort_percent=50, min_ended=4)).ok
    fresh = led.ledger.policy
    assert (fresh.kill_switch, fresh.rolled_back, fresh.v3_ended) == (False, "", 0)


def test_operator_cancels_do_not_count_against_v3() -> None:
    led = _ledger(policy(v3_percent=100, max_abort_percent=50, min_ended=2))
    for i in range(4):
        _end(led, i, "cancel")
    p = led.ledger.policy
    assert (p.v3_ended, p.v3_aborted, p.rolled_back) == (4, 0, "")
    assert led.ledger.migrations["m0"].reason == CANCEL_REASON
    assert led.ledger.migrations["m0"].cause == "operator"


def test_verification_failures_roll_back_at_the_named_count() -> None:
    led = _ledger(policy(v3_percent=100, max_verify_failures=2))
    _end(led, 0, "verification")
    _end(led, 1, "commit")
    assert not led.ledger.policy.kill_switch
    _end(led, 2, "verification")
    p = led.ledger.policy
    assert p.kill_switch and p.rolled_back.startswith(
        "2 v3 migrations failed verification (the policy allows 1); the last was m2")


def test_no_rule_no_rollback_and_an_unknown_cause_counts_as_other() -> None:
    led = _ledger(policy(v3_percent=100))
    for i in range(3):
        assert led.begin(f"vm{i}", A, B, f"m{i}", version=3).ok
        assert led.abort(f"m{i}", A, reason="?", cause="made-up").ok
    p = led.ledger.policy
    assert (p.v3_aborted, p.rolled_back) == (3, "")
    assert led.ledger.migrations["m0"].cause == "other"


def test_the_rollback_survives_a_snapshot() -> None:
    led = _ledger(policy(v3_percent=100, max_verify_failures=1))
    _end(led, 0, "verification")
    again = Ledger.restore(DCS, led.ledger.snapshot(), SIM_OPERATORS)
    assert again.policy == led.ledger.policy and again.policy.rolled_back
    assert again.snapshot() == led.ledger.snapshot()
    assert wire.encode(led.ledger.snapshot_message()) == led.ledger.snapshot()


# --------------------------------------------------------------------------- through PBFT


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_replica_rolls_back_at_the_same_entry(seed: int) -> None:
    """Four replicas over simulated links: v3 migrations end, a few fail verification; the
    one that crosses the policy's threshold turns the kill switch on at every replica at the
    same sequence number, and the policy (with its counters) is the same everywhere."""
    from sim.hosts.pbft_cluster import PbftCluster
    from tests.harness.ledger import LedgerDriver as Signer

    cluster = PbftCluster.standalone(seed)
    world = cluster.world
    signer = Signer()  # signs as the simulator's operators
    names = cluster.names
    failing = sorted(random.Random(seed).sample(range(8), 3))  # the third one crosses
    rolled_at: dict[str, int] = {}

    def watch() -> None:
        for name in names:
            r = cluster.replica(name)
            if r is not None and r.ledger.policy.rolled_back and name not in rolled_at:
                rolled_at[name] = r.last_exec

    def run_until(t: float) -> None:
        def each_event(w: object) -> bool:
            watch()
            return False

        world.run(until=t, predicate=each_event)
        assert world.violation is None, world.violation

    from consensus.ledger import (
        AbortMigration,
        AnnounceRoot,
        BeginMigration,
        ChangePolicy,
        CommitMigration,
        ImportVm,
        MigrateVm,
        RegisterVm,
    )

    src, dst = names[0], names[1]
    signer.clock = 0.0
    cluster.submit(names[2], ChangePolicy(signer.auth(
        policy(v3_percent=100, max_verify_failures=3), who="admin", at=0.5)))
    run_until(2.0)
    for i in range(8):
        cluster.submit(src, RegisterVm(f"vm{i}", src, signer.auth(
            ImportVm(f"vm{i}", src, "/sim"), at=1.0 + i / 100)))
    run_until(5.0)
    failures = 0
    for i in range(8):
        mid = f"m{i}"
        cluster.submit(src, BeginMigration(f"vm{i}", src, dst, 0, mid, signer.auth(
            MigrateVm(f"vm{i}", dst, src, 0), at=5.0 + i / 100), 3))
        run_until(world.now + 1.0)
        if i in failing:
            failures += 1
            cluster.submit(src, AbortMigration(mid, None, "the target gave up: the root of "
                                               "the received images does not match the root "
                                               "the source announced", "verification"))
        else:
            cluster.submit(src, AnnounceRoot(mid, b"\x02" * 32))
            run_until(world.now + 1.0)
            cluster.submit(dst, CommitMigration(mid, b"\x02" * 32))
        run_until(world.now + 1.0)
    run_until(world.now + 5.0)
    policies = {name: cluster.replica(name).ledger.policy for name in names}  # type: ignore[union-attr]
    assert len(set(policies.values())) == 1, policies
    final = policies[names[0]]
    assert final.v3_verify_failures == failures == 3
    assert final.kill_switch and final.rolled_back.endswith(f"the last was m{failing[-1]}")
    assert final.v3_ended == failing[-1] + 1, "nothing counted after the rollback"
    assert len(set(rolled_at.values())) == 1 and set(rolled_at) == set(names), rolled_at
