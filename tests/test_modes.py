"""Link modes (mesh.links.modes): the DESIGN.md table and hysteresis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.config import ModeThresholds
from mesh.links.modes import Mode, ModeClassifier, ModeLimits, classify

L = ModeLimits()


@pytest.mark.parametrize(("rtt", "bw", "loss", "mode"), [
    (5.0, 10_000.0, 0.0, Mode.DATACENTER),
    (5.0, 1000.0, 0.0009, Mode.DATACENTER),
    (5.0, None, 0.0, Mode.HYBRID),  # unmeasured bandwidth: cannot be a datacenter link
    (5.0, 999.0, 0.0, Mode.HYBRID),
    (10.0, 10_000.0, 0.0, Mode.HYBRID),
    (5.0, 10_000.0, 0.001, Mode.HYBRID),
    (30.0, 500.0, 0.005, Mode.HYBRID),
    (50.1, 10_000.0, 0.0, Mode.INTERNET),
    (5.0, 99.0, 0.0, Mode.INTERNET),
    (5.0, None, 0.011, Mode.INTERNET),
])
def test_design_table(rtt: float, bw: float | None, loss: float, mode: Mode) -> None:
    assert classify(L, rtt, bw, loss) is mode


def test_limits_copy_the_federation_thresholds() -> None:
    t = ModeThresholds(datacenter_rtt_ms=2.0, internet_rtt_ms=80.0, hysteresis=5)
    limits = ModeLimits.from_thresholds(t)
    assert (limits.datacenter_rtt_ms, limits.internet_rtt_ms, limits.hysteresis) == (2.0, 80.0, 5)
    assert ModeLimits.from_thresholds(ModeThresholds()) == ModeLimits()
    with pytest.raises(ValueError, match="hysteresis"):
        ModeLimits(hysteresis=0)


def test_a_change_must_hold_for_k_estimates_and_is_counted() -> None:
    c = ModeClassifier()
    (first,) = c.observe("a", "b", 5.0, 2000.0, 0.0)
    assert first.detail["mode"] == "datacenter" and c.switches == 0
    assert c.observe("a", "b", 80.0, 2000.0, 0.0) == []  # one outlier
    assert c.observe("a", "b", 5.0, 2000.0, 0.0) == []  # ... forgotten
    assert c.observe("a", "b", 80.0, 2000.0, 0.0) == []
    assert c.observe("a", "b", 80.0, 2000.0, 0.0) == []
    (switch,) = c.observe("a", "b", 80.0, 2000.0, 0.0)
    assert switch.kind == "link-mode"
    assert switch.detail == {"src": "a", "dst": "b", "mode": "internet", "was": "datacenter"}
    assert c.mode("a", "b") is Mode.INTERNET and c.switches == 1
    assert c.mode("b", "a") is None


@given(st.lists(st.sampled_from([(5.0, 2000.0, 0.0), (30.0, 500.0, 0.0), (90.0, 50.0, 0.02)]),
                max_size=60), st.integers(1, 5))
def test_modes_switch_only_after_k_equal_estimates(seq: list, k: int) -> None:
    c = ModeClassifier(ModeLimits(hysteresis=k))
    history = []
    for est in seq:
        before = c.mode("a", "b")
        out = c.observe("a", "b", *est)
        history.append(classify(c.limits, *est))
        if before is not None and out:
            assert len(history) >= k and len(set(history[-k:])) == 1
            assert c.mode("a", "b") is history[-1]
        if not out:
            assert c.mode("a", "b") is (before if before is not None else history[-1])
