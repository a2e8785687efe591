"""The stop window's fixed part reserved out of the downtime limit (issue 17): the round
policy with a fixed cost and a bias (federation.migration.precopy.decide), the harder
throttle before a fence over the limit, the node's measured history
(federation.migration.stop_costs), a source session measuring its own window, the node
core handing the estimate to the next migration of a VM, and the status showing it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.cli.ops import downtime, render_status, stop_reserve
from federation.migration.dc_status import MigrationView, SessionStatus
from federation.migration.precopy import (
    HARD_MAXIMUM,
    INCREMENT,
    MAXIMUM,
    decide,
    final_budget,
    final_estimate,
    first_round_throttle,
)
from federation.migration.source import SourceSession
from federation.migration.stop_costs import (
    BIAS_MAX,
    BIAS_MIN,
    HISTORY,
    PRIOR,
    START_PRIOR,
    STORE_KEY,
    VMS,
    StopCosts,
    StopHistory,
    costs_of_arrival,
    decode_history,
    encode_history,
    final_round_costs,
)
from federation.migration.vocabulary import (
    Fence,
    LedgerCommitted,
    Phase,
    PrecopyLimits,
    RoundSent,
    SendRound,
    SourceFenced,
)
from federation.node.status import migration_status, status
from mesh.core import Notify
from mesh.hde.image import PAGE_SIZE
from mesh.runtime.sqlite_store import StoreFull
from tests.harness.migration_session import of, one, precopy, session
from tests.harness.node import build_node, make_federation

# Loopback as the quiet run of 2026-12-08 measured it: 0.056 ms a page; 300 ms limit.
COST = 0.056e-3
LIMIT = 0.3


def _decide(dirty: list[int], **kw: object) -> Any:
    args: dict[str, object] = dict(round_=len(dirty), max_rounds=7, downtime=LIMIT,
                                   dirty=dirty, cost=COST, seconds=1.0, overhead=0.2,
                                   throttle=0, can_throttle=True)
    args.update(kw)
    return decide(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the policy


def test_the_quiet_runs_fence_no_longer_fits_once_the_fixed_part_is_reserved() -> None:
    # 2,712 dirty pages at 0.056 ms: 0.152 s, within 300 ms by the transfer alone ...
    assert final_estimate(2_712, COST) == pytest.approx(0.152, abs=1e-3)
    d = _decide([5_000, 2_712], throttle=90)
    assert d.fence and d.why == "fits"
    # ... but the stop window's measured fixed part took 183 ms of it: not within the
    # 117 ms left, so another round, not a fence
    d = _decide([5_000, 2_712], throttle=90, reserve=0.183)
    assert not d.fence
    # with the fixed part reserved, a final round within what is left fits
    d = _decide([5_000, 2_000], throttle=90, reserve=0.183)
    assert d.fence and d.why == "fits"


def test_the_bias_scales_the_final_rounds_estimate() -> None:
    # 2,000 pages: 0.112 s at the pre-copy pace, within the 117 ms left ...
    assert _decide([5_000, 2_000], reserve=0.183).fence
    # ... but the last final round took 1.2x its estimate: 0.134 s, not within
    d = _decide([5_000, 2_000], reserve=0.183, bias=1.2)
    assert not d.fence
    # a bias under 1 (final rounds faster than estimated) lets more through
    assert _decide([5_000, 2_300], reserve=0.183, bias=0.8).fence


def test_with_no_reserve_no_bias_and_the_old_ceiling_the_rule_is_unchanged() -> None:
    cases: list[tuple[list[int], dict[str, object]]] = [
        ([900], {}), ([2_712], {"seconds": 0.4}), ([5_000, 4_900], {"throttle": 90}),
        ([5_000, 4_900], {"throttle": 40}), ([8_000, 3_000], {"throttle": 20}),
        ([3_000] * 6, {}), ([2_000, 1_950], {"can_throttle": False}),
    ]
    for dirty, kw in cases:
        plain = _decide(dirty, **kw)
        assert _decide(dirty, reserve=0.0, bias=1.0, ceiling=MAXIMUM, **kw) == plain


def test_the_budget_is_the_limit_less_the_reserve_never_below_none() -> None:
    assert final_budget(0.3, 0.183) == pytest.approx(0.117)
    assert final_budget(0.3, 0.5) == 0.0
    # a reserve the whole limit: only a final round of no pages fits
    assert _decide([0], reserve=0.5).fence
    assert not _decide([10], reserve=0.5).fence


def test_the_budget_of_the_throttle_is_what_the_reserve_leaves() -> None:
    # 6,000 pages written in 1 s; the next round takes 0.54 s and the guest writes 3,216
    # pages meanwhile: within the 5,357 the whole limit carries (no throttle), not within
    # the 2,089 that 117 ms carry (held 36 %)
    plain = _decide([6_000], seconds=1.0, overhead=0.2)
    reserved = _decide([6_000], seconds=1.0, overhead=0.2, reserve=0.183)
    assert not plain.fence and not reserved.fence
    assert plain.throttle == 0 and reserved.throttle == 36


def test_at_the_maximum_a_guest_that_does_not_fit_is_throttled_harder_not_fenced() -> None:
    # the old rule: at 90 % with the dirty pages not falling, fence over the limit
    d = _decide([5_000, 4_900], throttle=MAXIMUM, reserve=0.183)
    assert d.fence and d.why == "no progress"
    # given the hard ceiling: up to it first
    d = _decide([5_000, 4_900], throttle=MAXIMUM, reserve=0.183, ceiling=HARD_MAXIMUM)
    assert not d.fence and MAXIMUM < d.throttle <= HARD_MAXIMUM
    assert d.throttle >= min(HARD_MAXIMUM, MAXIMUM + INCREMENT)
    # at the ceiling and still not falling: the fence, over the limit, is all that is left
    d = _decide([5_000, 4_900], throttle=HARD_MAXIMUM, reserve=0.183, ceiling=HARD_MAXIMUM)
    assert d.fence and d.why == "no progress"


def test_the_hard_ceiling_is_reached_only_from_the_maximum() -> None:
    # a guest far over the budget is first held at MAXIMUM, not straight at the ceiling
    d = _decide([40_000], seconds=0.5, overhead=1.0, reserve=0.183, ceiling=HARD_MAXIMUM)
    assert not d.fence and d.throttle == MAXIMUM
    d = _decide([40_000, 30_000], seconds=0.5, overhead=1.0, throttle=MAXIMUM,
                reserve=0.183, ceiling=HARD_MAXIMUM)
    assert not d.fence and d.throttle == HARD_MAXIMUM


def test_round_1s_sample_is_judged_against_what_the_reserve_leaves() -> None:
    plain = first_round_throttle(700, 0.5, 0.6, COST, LIMIT)
    reserved = first_round_throttle(700, 0.5, 0.6, COST, LIMIT, reserve=0.183, bias=1.2)
    assert reserved > plain


@given(st.lists(st.integers(0, 50_000), min_size=1, max_size=7),
       st.floats(0.0, 1.0), st.floats(BIAS_MIN, BIAS_MAX), st.integers(0, HARD_MAXIMUM),
       st.booleans())
def test_a_fence_on_fits_always_leaves_the_estimate_within_the_budget(
        dirty: list[int], reserve: float, bias: float, throttle: int, can: bool) -> None:
    d = _decide(dirty, reserve=reserve, bias=bias, throttle=throttle, can_throttle=can,
                ceiling=HARD_MAXIMUM)
    if d.why == "fits":
        assert final_estimate(dirty[-1], COST) * bias <= final_budget(LIMIT, reserve)
    # the throttle never goes down, and never past the ceiling it was given
    assert throttle <= d.throttle <= max(throttle, HARD_MAXIMUM)
    if not can:
        assert d.throttle == throttle


# ---------------------------------------------------------------------- the history


def test_the_history_starts_at_the_prior_and_keeps_it_as_a_floor_until_trusted() -> None:
    h = StopHistory()
    e = h.estimate("vm1")
    assert e.measured == () and e.bias == PRIOR.bias
    assert e.reserve == pytest.approx(PRIOR.fence_s + PRIOR.final_fixed_s + PRIOR.after_s)
    # a source's migration of vm1 measured its fence and bias; the after-part not. One
    # figure is not trusted yet: the prior stays a floor under it (a lucky run, 10 ms)
    h.record("vm1", StopCosts(fence_s=0.25, final_fixed_s=0.01, bias=1.3))
    e = h.estimate("vm1")
    assert e.measured == ("fence_s", "final_fixed_s", "bias")
    assert e.costs.fence_s == 0.25 and e.costs.final_fixed_s == PRIOR.final_fixed_s
    assert e.reserve == pytest.approx(0.25 + PRIOR.final_fixed_s + PRIOR.after_s)
    assert e.bias == 1.3
    # a target's arrival of vm2 measured the after-part: the node's for any VM
    h.record("vm2", costs_of_arrival({"fence_and_final_round_ms": 250.0, "verify_ms": 2.0,
                                      "commit_ms": 30.0, "start_ms": 48.0}))
    assert h.estimate("vm1").costs.after_s == PRIOR.after_s  # 0.08 against the prior's 0.08
    # vm2's own figures first, the node's for the rest
    h.record("vm2", StopCosts(fence_s=0.05))
    e2 = h.estimate("vm2")
    assert e2.costs.fence_s == PRIOR.fence_s  # 50 ms once: under the prior's floor
    assert e2.costs.bias == 1.3  # the node's (vm1's) bias


def test_the_reserve_is_the_recent_maximum_so_one_lucky_run_does_not_shrink_it() -> None:
    h = StopHistory()
    for fence in (0.09, 0.12, 0.07):  # three measured: trusted, the prior no floor
        h.record("vm1", StopCosts(fence_s=fence))
    assert h.estimate("vm1").costs.fence_s == 0.12
    h.record("vm1", StopCosts(fence_s=0.01))  # a lucky run
    assert h.estimate("vm1").costs.fence_s == 0.12
    assert h.by_vm["vm1"].fence_s == 0.01  # the last one is still known as the last
    # only the last HISTORY figures count: the 120 ms one ages out
    for _ in range(HISTORY - 3):
        h.record("vm1", StopCosts(fence_s=0.05))
    assert h.estimate("vm1").costs.fence_s == 0.12  # 90 ms aged out, 120 ms not yet
    h.record("vm1", StopCosts(fence_s=0.05))
    assert h.estimate("vm1").costs.fence_s == 0.07
    assert len(h.samples["vm1"]["fence_s"]) == HISTORY == len(h.samples[""]["fence_s"])


def test_the_history_keeps_the_vms_measured_last() -> None:
    h = StopHistory()
    for i in range(VMS + 5):
        h.record(f"vm{i}", StopCosts(after_s=0.1))
    assert len(h.samples) == VMS + 1 and "vm4" not in h.samples  # and the node's
    h.record("vm5", StopCosts(after_s=0.1))  # the oldest, measured again: kept
    h.record("new", StopCosts(after_s=0.1))
    assert len(h.samples) == VMS + 1 and "vm5" in h.samples and "vm6" not in h.samples
    assert set(h.by_vm) == set(h.samples) - {""}
    h.record("", StopCosts(after_s=0.2))  # no VM name: the node's figures only
    assert len(h.samples) == VMS + 1 and h.samples[""]["after_s"][-1] == 0.2


class _Store:
    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.kv.get(key)

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        self.kv[key] = value

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.kv if k.startswith(prefix))


def test_the_history_is_read_back_from_the_store() -> None:
    store = _Store()
    h = StopHistory(store=store)
    for fence in (0.2, 0.11, 0.13):
        h.record("vm1", StopCosts(fence_s=fence, bias=0.9))
    h.record("vm2", StopCosts(after_s=0.06))
    h.record("vm1", StopCosts(after_s=0.07))  # measured last: dropped last
    again = StopHistory(store=store)
    assert again.samples == h.samples and again.load_error == ""
    assert list(again.samples) == list(h.samples) == ["", "vm2", "vm1"]
    assert again.estimate("vm1") == h.estimate("vm1")
    assert again.estimate("vm2") == h.estimate("vm2")
    assert again.by_vm == {"vm1": StopCosts(fence_s=0.13, after_s=0.07, bias=0.9),
                           "vm2": StopCosts(after_s=0.06)}
    assert again.summary() == h.summary()
    # a record it cannot read is set aside: the prior, and the reason
    store.kv[STORE_KEY] = b'{"vm1": {"fence_s": [-1]}}'
    broken = StopHistory(store=store)
    assert broken.samples == {} and "fence_s" in broken.load_error
    assert broken.estimate("vm1").measured == ()
    assert "load_error" in broken.summary()


def test_status_shows_the_reserve_and_where_each_part_came_from() -> None:
    h = StopHistory()
    assert "prior" in stop_reserve(h.summary())
    for fence in (0.2, 0.11, 0.13):
        h.record("vm1", StopCosts(fence_s=fence))
    h.record("vm1", StopCosts(after_s=0.01))
    line = stop_reserve(h.summary())
    assert "fence 200 ms (max of 3)" in line
    assert "after 80 ms (max of 1, prior as floor)" in line
    assert "final_fixed 25 ms (prior)" in line
    assert line.startswith(f"{(0.2 + PRIOR.final_fixed_s + PRIOR.after_s) * 1000:.0f} ms")


_FIGURE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                    st.booleans(), st.text(max_size=3), st.none())


@given(st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.text(max_size=4), st.dictionaries(
        st.sampled_from(["fence_s", "final_fixed_s", "after_s", "bias", "other"]),
        st.lists(_FIGURE, max_size=HISTORY + 1), max_size=5), max_size=4).map(
        lambda d: json.dumps(d).encode())))
def test_decode_history_takes_a_valid_record_or_names_the_fault(raw: bytes) -> None:
    try:
        got = decode_history(raw)
    except ValueError as exc:
        assert str(exc)
        return
    assert decode_history(encode_history(got)) == got
    h = StopHistory(store=_Store())
    h.samples = got
    h.estimate("x")  # a decoded history always gives an estimate


def test_the_history_drops_impossible_figures_and_bounds_the_bias() -> None:
    h = StopHistory()
    h.record("vm1", StopCosts(fence_s=-0.2, after_s=0.1, bias=40.0))
    e = h.estimate("vm1")
    assert e.costs.fence_s == PRIOR.fence_s and e.costs.after_s == 0.1
    assert e.bias == BIAS_MAX
    h.record("vm1", StopCosts(bias=0.01))
    assert h.samples["vm1"]["bias"] == [BIAS_MAX, BIAS_MIN]
    assert h.estimate("vm1").bias == BIAS_MAX  # the recent maximum
    h.record("vm1", StopCosts(fence_s=float("inf"), after_s=float("nan")))
    assert h.samples["vm1"]["after_s"] == [0.1]  # a clock gives no such figures
    assert costs_of_arrival({"verify_ms": 1.0}) == StopCosts()
    with pytest.raises(ValueError, match="prior"):
        StopHistory(StopCosts(fence_s=0.1))


# ---------------------------------------------------------------------- the session


def _through_round_1(s: SourceSession, dirty: int) -> list[Any]:
    precopy(s)
    # round 1 of a return trip: 9 MB on the wire moved in 0.5 s (0.23 ms a page)
    return s.handle(10.0, RoundSent(1, 65_536, 65_536 * PAGE_SIZE, 9_000_000, 1.0, dirty,
                                    0.5))


def test_the_session_reserves_what_it_is_given_and_says_so() -> None:
    s = session(PrecopyLimits(7, 1.0))
    out = _through_round_1(s, 4_000)  # 0.91 s at 0.228 ms: within 1 s
    assert of(out, Fence)
    s = session(PrecopyLimits(7, 1.0))
    s.use_stop_estimate(StopHistory().estimate("vm1"), HARD_MAXIMUM)
    assert s.reserve == pytest.approx(0.205) and s.ceiling == HARD_MAXIMUM
    out = _through_round_1(s, 4_000)  # not within the 0.795 s left
    assert not of(out, Fence) and of(out, SendRound)
    note = next(a for a in out if isinstance(a, Notify) and a.kind == "migration.precopy")
    assert note.detail["reserve_s"] == pytest.approx(0.205) and not note.detail["fence"]
    view = SessionStatus.of(s)
    assert view.stop_reserve == pytest.approx(0.205) and view.reserve_measured == ()


def test_the_session_measures_its_own_stop_window() -> None:
    s = session(PrecopyLimits(7, 1.0))
    s.use_stop_estimate(StopHistory().estimate("vm1"), HARD_MAXIMUM)
    out = _through_round_1(s, 3_000)  # 0.68 s: within the 0.795 s left
    assert of(out, Fence) and s.phase is Phase.FENCED
    cost = s.page_cost
    s.handle(10.3, SourceFenced(b"R" * 32))  # the fence took 0.3 s
    # the final round: 3,100 pages in 0.9 s, estimated at 0.71 s
    s.handle(11.2, RoundSent(2, 3_100, 3_100 * PAGE_SIZE, 12_000_000, 0.9, 0, 0.8))
    assert s.phase is Phase.VERIFYING
    out = s.handle(11.3, LedgerCommitted("m1", 4, b"R" * 32))  # committed 0.1 s after the round
    note = one([a for a in out if isinstance(a, Notify) and a.kind ==
                "migration.stop-costs"], Notify)
    c = s.stop_costs
    assert c is not None and note.detail["vm"] == "vm1"
    assert c.fence_s == pytest.approx(0.3)
    assert c.final_fixed_s == pytest.approx(0.9 - 3_100 * cost)  # the excess: fixed
    assert c.after_s == pytest.approx(0.1 + START_PRIOR)
    assert c.bias == 1.0
    assert SessionStatus.of(s).stop_costs == {"fence_s": c.fence_s,
                                              "final_fixed_s": c.final_fixed_s,
                                              "after_s": c.after_s, "bias": c.bias}


def test_a_final_rounds_excess_is_fixed_and_only_a_faster_one_sets_a_bias() -> None:
    # under load: 654 pages estimated at 63 ms took 470 ms; its excess is latency
    fixed, bias = final_round_costs(0.470, 654, 0.0965e-3)
    assert fixed == pytest.approx(0.470 - 654 * 0.0965e-3) and bias == 1.0
    # faster than estimated: a bias under 1, nothing fixed
    fixed, bias = final_round_costs(0.100, 2_000, 0.1e-3)
    assert fixed == 0.0 and bias == pytest.approx(0.5)
    # too few pages for a bias; no cost to measure by
    assert final_round_costs(0.05, 10, 0.1e-3) == (pytest.approx(0.049), None)
    assert final_round_costs(0.05, 10, 0.0) == (None, None)


def test_a_final_round_of_few_pages_measures_no_bias() -> None:
    s = session(PrecopyLimits(7, 1.0))
    _through_round_1(s, 10)
    s.handle(10.1, SourceFenced(b"R" * 32))
    s.handle(10.2, RoundSent(2, 10, 10 * PAGE_SIZE, 40_000, 0.1, 0, 0.05))
    s.handle(10.3, LedgerCommitted("m1", 4, b"R" * 32))
    assert s.stop_costs is not None and s.stop_costs.bias is None


def test_the_status_line_shows_the_downtime_at_the_target_and_the_reserve_at_the_source(
        ) -> None:
    assert downtime({"downtime_ms": 243.6}) == "244 ms"
    assert downtime({"stop_reserve_ms": 183.0}) == "reserve 183 ms"
    assert downtime({}) == "-"


def test_the_sources_status_shows_the_reserve_and_what_it_measured() -> None:
    s = session(PrecopyLimits(7, 1.0))
    s.use_stop_estimate(StopHistory().estimate("vm1"), HARD_MAXIMUM)
    view = MigrationView("m1", None, SessionStatus.of(s), None, None)
    counters = SimpleNamespace(paths={}, streams={}, received={})
    node = SimpleNamespace(name="dc1", core=SimpleNamespace(migration=lambda mid: view),
                           rounds=SimpleNamespace(counters=counters))
    out = migration_status(node, "m1")  # type: ignore[arg-type]
    assert out is not None
    assert out["stop_reserve_ms"] == 205.0 and out["stop_bias"] == 1.0
    assert out["reserve_measured"] == [] and "stop_costs" not in out
    assert downtime(out) == "reserve 205 ms"
    # once committed, what the migration measured of its own window
    s.stop_costs = StopCosts(0.3, 0.1, 0.15, None)
    view = MigrationView("m1", None, SessionStatus.of(s), None, None)
    out = migration_status(node, "m1")  # type: ignore[arg-type]
    assert out is not None
    assert out["stop_costs"] == {"fence_s": 0.3, "final_fixed_s": 0.1, "after_s": 0.15,
                                 "bias": None}


def test_a_restarted_node_reserves_what_it_measured_before(tmp_path: Path) -> None:
    """The history lives in the node's SQLite store: a node built again on the same data
    directory (a restart) judges its next migration with the figures measured before it,
    not with the prior, and ``dwcp status`` shows them."""
    cfg = make_federation(tmp_path / "fed")
    node = build_node(cfg, "dc1", tmp_path / "data")
    try:
        for fence, after in ((0.12, 0.05), (0.3, 0.04), (0.1, 0.06)):
            node.stop_history.record("vm1", StopCosts(fence_s=fence, after_s=after))
        before = node.stop_history.estimate("vm1")
    finally:
        node.close()
    again = build_node(cfg, "dc1", tmp_path / "data")
    try:
        est = again.stop_history.estimate("vm1")
        assert est == before and est.costs.fence_s == 0.3 and est.costs.after_s == 0.06
        assert est.measured == ("fence_s", "after_s")
        doc = status(again)["stop_reserve"]
        assert doc["measured"]["fence_s"] == 3 and doc["reserved_ms"]["fence_s"] == 300.0
        assert "fence 300 ms (max of 3)" in render_status(status(again))
    finally:
        again.close()


def test_a_node_that_cannot_write_its_history_keeps_it_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (netns-chaos's fault) fails the history's write: logged, never raised
    into the core that measured the stop window; the figures are kept in memory."""
    cfg = make_federation(tmp_path / "fed")
    node = build_node(cfg, "dc1", tmp_path / "data")
    try:
        def full(key: str, value: bytes, sync: bool = True) -> None:
            raise StoreFull(f"{key}: database or disk is full (test)")

        monkeypatch.setattr(node.store, "put", full)
        node.stop_history.record("vm1", StopCosts(fence_s=0.2))
        assert node.stop_history.samples["vm1"]["fence_s"] == [0.2]
        assert "store_write_skipped" in node.log._stream.getvalue()  # type: ignore[union-attr]
    finally:
        node.close()
