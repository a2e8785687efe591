"""Transfer version choice from the ledger's rollout policy."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.ledger import SetPolicy, v3_allowed
from federation.migration.rollout import (
    DEFAULT_POLICY,
    V1,
    V3,
    RolloutError,
    choose_version,
    rollout_bucket,
    round_version,
)

VM_NAMES = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


def policy(pct: int = 0, dcs: tuple[str, ...] = (), vms: tuple[str, ...] = (),
           kill: bool = False) -> SetPolicy:
    return SetPolicy(pct, dcs, vms, kill)


def test_default_policy_is_v1() -> None:
    assert choose_version(DEFAULT_POLICY, "vm", "dc1", "dc2", (1, 3), (1, 3)) == V1


def test_full_rollout_is_v3_and_kill_switch_wins() -> None:
    assert choose_version(policy(100), "vm", "dc1", "dc2", (1, 3), (1, 3)) == V3
    assert choose_version(policy(100, ("dc1",), ("vm",), True), "vm", "dc1", "dc2",
                          (1, 3), (1, 3)) == V1


@pytest.mark.parametrize("p", [policy(0, dcs=("dc1",)), policy(0, dcs=("dc2",)),
                               policy(0, vms=("vm",))])
def test_target_lists_get_v3(p: SetPolicy) -> None:
    assert choose_version(p, "vm", "dc1", "dc2", (1, 3), (1, 3)) == V3
    assert choose_version(p, "other", "dc3", "dc4", (1, 3), (1, 3)) == V1


def test_versions_both_sides_must_offer() -> None:
    assert choose_version(policy(100), "vm", "dc1", "dc2", (1, 3), (1,)) == V1
    with pytest.raises(RolloutError, match="no common"):
        choose_version(policy(100), "vm", "dc1", "dc2", (1,), (3,))
    with pytest.raises(RolloutError, match="forbids"):
        choose_version(policy(0), "vm", "dc1", "dc2", (3,), (3,))


@given(VM_NAMES, st.integers(0, 100), st.integers(0, 100))
def test_raising_the_percentage_only_adds_vms(vm: str, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert 0 <= rollout_bucket(vm) < 100
    if v3_allowed(policy(lo), vm, "x", "y"):
        assert v3_allowed(policy(hi), vm, "x", "y")
    assert v3_allowed(policy(a), vm, "x", "y") == (rollout_bucket(vm) < a)


def test_percentage_splits_vms_about_evenly() -> None:
    names = [f"vm-{i}" for i in range(2000)]
    share = sum(v3_allowed(policy(30), n, "a", "b") for n in names) / len(names)
    assert 0.26 < share < 0.34


def test_rollback_falls_back_mid_transfer_only_when_v1_is_common() -> None:
    kill = policy(100, kill=True)
    assert round_version(V3, (1, 3), kill, "vm", "a", "b") == V1
    assert round_version(V3, (3,), kill, "vm", "a", "b") == V3  # finishes with v3
    assert round_version(V3, (1, 3), policy(100), "vm", "a", "b") == V3
    assert round_version(V1, (1, 3), policy(100), "vm", "a", "b") == V1  # never upgrades
