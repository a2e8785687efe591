"""The pre-copy round policy (federation.migration.precopy): one test per rule, the
estimates it rests on, and a source session carrying its decisions out (Throttle before
the next round, the fence, a backend that cannot throttle)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from federation.dataplane import v3_source
from federation.dataplane.v3_shadow import COPY_PAGES, SourceState
from federation.dataplane.v3_source import V3RoundSender, _EarlySample
from federation.migration.precopy import (
    FIRST_ROUND_SHARE,
    INCREMENT,
    INITIAL,
    MAXIMUM,
    decide,
    final_estimate,
    first_round_throttle,
    page_cost,
    throttle_for,
    unthrottled_rate,
)
from federation.migration.round_events import ToSession, V3Prepare, V3Preparing
from federation.migration.round_source import V3Sending
from federation.migration.source import SourceSession
from federation.migration.vocabulary import (
    Fence,
    Phase,
    PrecopyLimits,
    RoundSent,
    SendRound,
    Throttle,
    Throttled,
    TransferProgress,
)
from federation.node.assembly import link_Bps
from federation.vms.dirty_scan import GROUP_PAGES, SentDigests
from mesh.gossip.control_msgs import LinkEntry
from mesh.hde.image import PAGE_SIZE, create_image, open_image
from mesh.links.estimates import LinkTable
from tests.harness.gossip import said_link, statements_for
from tests.harness.migration_session import of, one, precopy, session

# A 100 Mbit/s link moving incompressible pages: 12.5 MB/s, 0.328 ms a page; a 300 ms
# downtime limit then carries 915 pages.
COST = PAGE_SIZE / 12.5e6
LIMIT = 0.3


def _decide(dirty: list[int], **kw: object) -> object:
    args: dict[str, object] = dict(round_=len(dirty), max_rounds=7, downtime=LIMIT,
                                   dirty=dirty, cost=COST, seconds=1.0, overhead=0.5,
                                   throttle=0, can_throttle=True)
    args.update(kw)
    return decide(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the estimates


def test_round_1_costs_a_page_by_its_wire_bytes_not_the_pages_the_target_held() -> None:
    # a return trip's round 1: 65,536 pages covered, 9 MB on the wire in 0.75 s
    assert page_cost(1, 65_536, 9_000_000, 3.0, 0.75) == pytest.approx(
        0.75 / (9_000_000 / PAGE_SIZE))
    # an incremental round: its own pages over its moving time (not its preparation)
    assert page_cost(2, 2_000, 8_000_000, 1.5, 0.7) == pytest.approx(0.7 / 2_000)
    assert page_cost(3, 100, 0, 1.0, None) == pytest.approx(1.0 / 100)  # v1: no split
    assert page_cost(2, 0, 0, 0.2, 0.1) == 0.0  # nothing moved: nothing measured


def test_the_final_round_estimate_is_its_pages_at_the_measured_cost() -> None:
    assert final_estimate(915, COST) == pytest.approx(0.2998, abs=1e-3)
    assert final_estimate(0, 0.0) == 0.0
    assert final_estimate(3, 0.0) == math.inf


def test_the_unthrottled_rate_counts_the_time_a_throttled_guest_was_held() -> None:
    assert unthrottled_rate(1_000, 2.0, 0) == 500.0
    assert unthrottled_rate(100, 2.0, 90) == pytest.approx(500.0)
    assert unthrottled_rate(5, 0.0, 0) == 0.0


def test_the_throttle_goes_straight_to_what_makes_the_round_fit() -> None:
    assert throttle_for(1_432, 0.5, 915) == 0  # 716 pages fit already
    # 1,432 pages/s over a 1 s round: 1,432 written, 915 fit: held 37 % of the time
    assert throttle_for(1_432, 1.0, 915) == 37
    assert throttle_for(1_432, 1.1, 915) == 42
    assert throttle_for(1_432, 0.7, 915) == INITIAL  # a little over: at least QEMU's 20 %
    assert throttle_for(100_000, 5.0, 915) == MAXIMUM  # never more than 90 %


# ---------------------------------------------------------------------- one rule each


def test_rule_fits_fences_as_soon_as_the_final_round_fits_even_after_round_1() -> None:
    d = _decide([900])
    assert d.fence and d.why == "fits" and d.throttle == 0
    d = _decide([5_000, 900], throttle=40)
    assert d.fence and d.why == "fits" and d.throttle == 40


def test_rule_round_cap_fences_before_the_round_the_mode_would_not_allow() -> None:
    d = _decide([3_000] * 6, max_rounds=7)
    assert d.fence and d.why == "round cap"
    assert not _decide([3_000, 2_000], max_rounds=7).fence


def test_rule_no_progress_fences_when_the_throttle_can_go_no_higher() -> None:
    d = _decide([3_000, 2_900], throttle=MAXIMUM)
    assert d.fence and d.why == "no progress"
    d = _decide([3_000, 2_900], can_throttle=False)  # an image VM: no vCPU to hold
    assert d.fence and d.why == "no progress"
    # still falling: another round is worth its bytes
    assert not _decide([3_000, 2_000], throttle=MAXIMUM).fence
    assert not _decide([3_000, 2_000], can_throttle=False).fence


def test_rule_converge_at_once_throttles_against_the_link_after_the_first_round() -> None:
    # round 1 left 2,000 pages; the guest wrote them in 1 s; the next round moves them
    # in 0.66 s beside 0.5 s of fixed work: 1.16 s at 2,000 pages/s = 2,312 pages
    # against 915 that fit: held 61 % at once (QEMU would start at 20 %)
    d = _decide([2_000], seconds=1.0, overhead=0.5)
    assert not d.fence and d.why == "throttle"
    expected = math.ceil(100 * (1 - (LIMIT / COST) / (2_000 * (2_000 * COST + 0.5))))
    assert d.throttle == expected == 61
    # a rate the next round can carry: no throttle
    d = _decide([1_500], seconds=10.0, overhead=0.1)
    assert not d.fence and d.throttle == 0 and d.why == "converging"


def test_rule_converge_rises_at_least_one_step_when_the_dirty_count_did_not_fall() -> None:
    # the estimate alone would keep 30 %, but the round did not shrink: one step more
    d = _decide([2_000, 1_950], seconds=10.0, overhead=0.0, throttle=30)
    assert not d.fence and d.throttle == 30 + INCREMENT
    d = _decide([2_000, 1_950], seconds=10.0, overhead=0.0, throttle=0)
    assert d.throttle == INITIAL


def test_the_throttle_never_goes_down_within_a_migration() -> None:
    d = _decide([5_000, 2_000], seconds=100.0, overhead=0.0, throttle=70)
    assert not d.fence and d.throttle == 70


def test_a_vm_that_cannot_be_throttled_is_never_asked_to_be() -> None:
    d = _decide([2_000], seconds=1.0, overhead=0.5, can_throttle=False)
    assert not d.fence and d.throttle == 0


# ---------------------------------------------------------------------- in the session


def _session() -> SourceSession:
    s = session(PrecopyLimits(7, LIMIT))
    precopy(s)
    return s


def test_the_session_throttles_before_the_next_round_and_fences_when_it_fits() -> None:
    s = _session()
    # round 1: every page covered, 9 MB on the wire, 2,000 pages dirtied meanwhile
    out = s.handle(10.0, RoundSent(1, 65_536, 65_536 * PAGE_SIZE, 9_000_000, 1.0, 2_000,
                                   0.75))
    kinds = [type(a) for a in out]
    assert Throttle in kinds and SendRound in kinds
    assert kinds.index(Throttle) < kinds.index(SendRound)
    throttle = next(a for a in out if isinstance(a, Throttle))
    assert INITIAL <= throttle.percent <= MAXIMUM and s.throttle == throttle.percent
    s.handle(10.1, Throttled(throttle.percent))
    # round 2 moved its 2,000 pages; the throttled guest wrote 300 meanwhile: it fits
    out = s.handle(11.0, RoundSent(2, 2_000, 2_000 * PAGE_SIZE, 8_200_000, 1.0, 300, 0.66))
    assert any(isinstance(a, Fence) for a in out) and s.phase is Phase.FENCED


def test_a_refused_throttle_lets_the_session_stop_a_round_that_does_not_shrink() -> None:
    s = _session()
    out = s.handle(10.0, RoundSent(1, 65_536, 65_536 * PAGE_SIZE, 9_000_000, 1.0, 2_000,
                                   0.75))
    assert any(isinstance(a, Throttle) for a in out)
    s.handle(10.1, Throttled(0))  # an image VM, or a guest that stopped meanwhile
    assert not s.can_throttle and s.throttle == 0
    out = s.handle(11.0, RoundSent(2, 2_000, 2_000 * PAGE_SIZE, 8_200_000, 1.0, 1_990, 0.66))
    assert any(isinstance(a, Fence) for a in out) and s.phase is Phase.FENCED
    assert not any(isinstance(a, Throttle) for a in out)


# ---------------------------------------------------------------------- round 1's sample


def test_first_round_throttle_judges_the_sample_against_the_link() -> None:
    # 700 pages written in 0.5 s of the copy (1,400 pages/s), 0.6 s into round 1: round 1
    # lasts at least 1.2 s, 1,680 pages against half the 915 that fit (FIRST_ROUND_SHARE):
    # held 73 %
    assert FIRST_ROUND_SHARE == 0.5
    assert first_round_throttle(700, 0.5, 0.6, COST, LIMIT) == 73
    assert first_round_throttle(50, 0.5, 0.6, COST, LIMIT) == 0  # 168 pages fit
    assert first_round_throttle(700, 0.5, 0.6, 0.0, LIMIT) == 0  # no link figure: no call
    assert first_round_throttle(0, 0.5, 0.6, COST, LIMIT) == 0


def test_an_early_sample_judges_round_1_by_its_copys_projected_length() -> None:
    # 0.3 s into a copy projected to take 1.8 s: round 1 lasts at least 3.6 s, not 0.6 s;
    # 200 pages in 0.3 s (667 pages/s) write 2,400 pages against the 457 wanted: 81 %
    assert first_round_throttle(200, 0.3, 0.3, COST, LIMIT, 1.8) == 81
    assert first_round_throttle(200, 0.3, 0.3, COST, LIMIT) == 0  # 400 pages in 0.6 s fit
    # a projection shorter than what has elapsed changes nothing
    assert first_round_throttle(200, 0.3, 2.0, COST, LIMIT, 0.5) == \
        first_round_throttle(200, 0.3, 2.0, COST, LIMIT)


def test_round_1s_dirty_sample_throttles_the_guest_before_the_round_moves() -> None:
    s = _session()
    s.link_Bps = 12.5e6  # the mesh's figure for the link to the target
    out = s.handle(0.8, TransferProgress(1, 0, 0, 0, 65_536, 700, 0.5))
    throttle = one(out, Throttle)
    assert throttle.percent == first_round_throttle(700, 0.5, 0.6, COST, LIMIT) == 73
    assert s.throttle == 73
    # a throttle already as high is not asked again; without a link figure none is
    assert of(s.handle(0.8, TransferProgress(1, 0, 0, 0, 65_536, 700, 0.5)), Throttle) == []
    s = _session()
    assert of(s.handle(0.8, TransferProgress(1, 0, 0, 0, 65_536, 700, 0.5)), Throttle) == []


def test_the_rounds_core_passes_round_1s_sample_to_the_session() -> None:
    r = V3Sending(SendRound("m1", "vm1", 1, False, False, 3), "dc2", 0.0, None)
    out = r.handle(0.5, V3Preparing("m1", 1, 65_536, 700, 0.5, 1.8))
    progress = next(a.event for a in out if isinstance(a, ToSession))
    assert (progress.prepared, progress.dirtied, progress.dirty_seconds,
            progress.preparation_s) == (65_536, 700, 0.5, 1.8)


def test_an_early_sample_throttles_by_the_copys_projected_length() -> None:
    s = _session()
    s.link_Bps = 12.5e6
    # 0.4 s into round 1, 200 pages in 0.3 s, the copy projected to take 1.8 s
    out = s.handle(0.6, TransferProgress(1, 0, 0, 0, 8_192, 200, 0.3, 1.8))
    assert one(out, Throttle).percent == first_round_throttle(200, 0.3, 0.4, COST, LIMIT,
                                                              1.8) == 81
    # the sample at the copy's end can only raise it
    assert of(s.handle(2.0, TransferProgress(1, 0, 0, 0, 65_536, 100, 0.9, 1.8)),
              Throttle) == []
    assert s.throttle == 81


def test_round_1_samples_the_dirty_rate_early_in_its_copy(tmp_path: Path) -> None:
    rng = random.Random(6)
    live = create_image(tmp_path / "memory.img", 64, "memory")
    try:
        live.write(0, rng.randbytes(64 * PAGE_SIZE))
        early = _EarlySample({"memory": live})
        live.write(8, rng.randbytes(3 * PAGE_SIZE))  # pages 8-10: groups 2 (8-11)
        live.write(33, rng.randbytes(PAGE_SIZE))  # and 8 (32-35)
        live.write(63, bytes(live.view(63)))  # rewritten with the same bytes: not counted
        dirtied, seconds = early.sample({"memory": live})
    finally:
        live.close()
    assert dirtied == 2 * GROUP_PAGES  # a group that differs counts whole: a bound
    assert 0 < seconds < 5


def test_round_1_counts_the_pages_written_while_its_shadow_was_copied(tmp_path: Path) -> None:
    rng = random.Random(5)
    live = create_image(tmp_path / "memory.img", 64, "memory")
    try:
        live.write(0, rng.randbytes(64 * PAGE_SIZE))
        copied = SentDigests.blank(64)
        copied.read(0, bytes(live.view(0, 64)))  # the shadow's copy
        for p in (1, 7, 20, 40, 63):  # the guest writes on meanwhile
            live.write(p, rng.randbytes(PAGE_SIZE))
        sender = object.__new__(V3RoundSender)
        sender.action = V3Prepare("m1", "vm1", 1, "dc2", None)
        sender.state = SimpleNamespace(sent={"memory": copied})  # type: ignore[assignment]
        sender._prepared = 64
        reports: list[object] = []
        sender._report = reports.append
        trio.run(trio.to_thread.run_sync, sender._sample_dirty, {"memory": live}, 0.4)
    finally:
        live.close()
    (sample,) = reports
    assert isinstance(sample, V3Preparing)
    assert (sample.round, sample.pages, sample.dirtied) == (1, 64, 5)
    assert 0.2 <= sample.dirty_seconds < 5  # half the copy, then the scan


class _LiveGuest:
    """What round 1's refresh asks of a backend, over one image file a test writes to: a
    VM tracked by content (the qemu backend's answers)."""

    def __init__(self, path: Path, pages: int) -> None:
        self.path, self.pages = path, pages

    def dirty_by_content(self, name: str) -> bool:
        return True

    def dirty_mark(self, name: str) -> int:
        return 0

    def info(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(layout=(("memory", self.pages),))

    def open_images(self, name: str) -> dict[str, object]:
        return {"memory": open_image(self.path, "memory")}


def test_round_1_reports_the_early_sample_while_its_copy_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pages = 2 * COPY_PAGES  # two pieces: the sample comes after the first
    live = create_image(tmp_path / "memory.img", pages, "memory")
    live.write(0, random.Random(7).randbytes(PAGE_SIZE) * pages)
    monkeypatch.setattr(v3_source, "EARLY_SAMPLE_S", 0.0)
    sender = object.__new__(V3RoundSender)
    sender.action = V3Prepare("m1", "vm1", 1, "dc2", None)
    sender.backend = _LiveGuest(tmp_path / "memory.img", pages)  # type: ignore[assignment]
    sender.state = SourceState(tmp_path / "shadow")
    sender._executor = None
    sender._news, sender._built = {}, {}
    sender._prepared, sender._next_prepared = 0, math.inf
    sender._stream = None  # the round diffed (a warm target): no streaming of the copy
    sender._choose_level = lambda sample: ("zstd", 1)  # chosen before the copy (round 1)
    reports: list[object] = []
    sender._report = reports.append
    wrote: list[int] = []

    def preparing(n: int) -> None:  # the guest writes while the first piece is copied
        sender._prepared += n
        if not wrote:
            live.write(COPY_PAGES + 5, bytes(PAGE_SIZE))  # one page of group 1025
            live.write(40, bytes(2 * PAGE_SIZE))  # pages 40-41: group 10
            wrote.append(n)

    sender._preparing = preparing  # type: ignore[method-assign,assignment]
    try:
        covered, olds, _ = trio.run(trio.to_thread.run_sync, sender._refresh)
    finally:
        live.close()
        sender.state.close()
    assert covered == pages and olds == {}
    early, late = (r for r in reports if isinstance(r, V3Preparing) and r.dirty_seconds > 0)
    # after the first piece: the two groups written, counted whole, with the copy's
    # projected length (twice the first piece's time)
    assert (early.pages, early.dirtied) == (COPY_PAGES, 2 * GROUP_PAGES)
    assert 0 < early.preparation_s < 60
    # after the copy: the pages that differ from what was copied (the second piece was
    # copied after the write: page 4101 went out new; pages 40-41 were copied before)
    assert (late.pages, late.dirtied) == (pages, 2)


def test_without_a_link_figure_round_1s_sample_waits_for_the_rounds_own_pace() -> None:
    s = _session()  # the mesh had no figure for the link when the migration was planned
    assert of(s.handle(0.8, TransferProgress(1, 0, 0, 0, 65_536, 700, 0.5)), Throttle) == []
    # the round moves: 1 MB on the wire, then 12.5 MB more in the next second (100 Mbit/s)
    assert of(s.handle(2.0, TransferProgress(1, 10_000_000, 2_441, 1_000_000)), Throttle) == []
    out = s.handle(3.0, TransferProgress(1, 60_000_000, 14_648, 13_500_000))
    throttle = one(out, Throttle)
    # judged 2.8 s into round 1: 1,400 pages/s over 5.6 s, 7,840 against the 457 wanted
    assert throttle.percent == first_round_throttle(700, 0.5, 2.8, COST, LIMIT) == MAXIMUM
    # judged once
    assert of(s.handle(4.0, TransferProgress(1, 90_000_000, 21_972, 26_000_000)), Throttle) == []


def test_round_1s_fixed_work_stands_for_the_next_rounds_until_one_is_measured() -> None:
    s = _session()
    # round 1 spent 30 s preparing beside 0.75 s of moving: the next round's fixed work
    # is taken as 30 s until an incremental round measures its own
    out = s.handle(40.0, RoundSent(1, 65_536, 65_536 * PAGE_SIZE, 9_000_000, 30.75, 2_700,
                                   0.75))
    assert s.overhead == pytest.approx(30.0)
    # 2,700 pages in 30.75 s: 88 pages/s over a 30.9 s round, 2,712 against the 879 that
    # fit at round 1's 0.34 ms a page: held 68 % (with no fixed work: not at all)
    assert one(out, Throttle).percent == 68
    s.handle(40.1, Throttled(MAXIMUM))
    s.handle(45.0, RoundSent(2, 2_700, 2_700 * PAGE_SIZE, 11_000_000, 5.0, 1_200, 1.0))
    assert s.overhead == pytest.approx(4.0)


# ---------------------------------------------------------------------- in the simulator


def test_a_seeded_chaos_run_throttles_stops_early_and_leaves_no_guest_throttled() -> None:
    """migration-chaos, seed 1, every migration under a 5 ms downtime limit: the policy
    throttles the simulated guests (whose writer then writes less) and fences some
    migrations for lack of progress; the oracle holds, and the quiet phase only settles
    once no guest stays throttled after its migration."""
    import sim.scenarios  # noqa: F401, PLC0415 (registers the scenarios)
    from sim.scenario import run_scenario  # noqa: PLC0415

    run = run_scenario("migration-chaos", 1, params={"downtime_limit": 0.005})
    assert run.ok, run.violations
    assert run.metrics["migration"]["throttles"] >= 1
    assert run.metrics["migration"]["ledger"].get("committed", 0) >= 5


# ---------------------------------------------------------------------- the link's figure


def test_round_1s_sample_is_judged_by_the_other_directions_figure_on_a_return() -> None:
    names = ["dc1", "dc3"]
    t = LinkTable("dc3", names, statements_for("dc3", names))
    assert link_Bps(t, "dc3", "dc1") is None  # nothing measured either way

    def merge(origin: str, peer: str, version: int, bw: float | None) -> None:
        e = LinkEntry(origin, peer, version, 50.0, 5.0, 1.0, 0.0, False, bw)
        if origin == "dc3":  # this node's own figures, from its prober
            t.put_own(0.0, e)
        else:  # dc1's, by gossip
            t.merge(0.0, t.open(0.0, "dc1", [said_link(e)]))

    # the trip there: dc1 measured dc1 -> dc3 at 100 Mbit/s, dc3 reported what it receives
    merge("dc1", "dc3", 1, 100.0)
    merge("dc3", "dc1", 1, None)
    assert link_Bps(t, "dc3", "dc1") == pytest.approx(12.5e6)  # the return: dc1 -> dc3's
    assert link_Bps(t, "dc1", "dc3") == pytest.approx(12.5e6)
    # once dc3 -> dc1 was measured itself, its own figure
    merge("dc3", "dc1", 2, 40.0)
    assert link_Bps(t, "dc3", "dc1") == pytest.approx(5e6)
