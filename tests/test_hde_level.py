"""The zstd level picker (mesh.hde.level): never a level that moves the pages slower than
sending them uncompressed would on the measured link (issue 17 item 6)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mesh.hde
from mesh.hde.level import (
    LEVELS,
    MODE_LEVELS,
    LevelGovernor,
    LevelSample,
    choose_level,
    measure_ladder,
    measure_levels,
    uncompressed_rate,
)


def test_a_slow_level_on_a_fast_link_loses_to_store_even_in_internet_mode() -> None:
    # An "internet" link by its RTT that drains 1 Gbit/s: level 1 at 100 MB/s per core and
    # ratio 0.9 moves 200 MB/s on two cores, sending as is moves 125 MB/s... and level 9
    # at 20 MB/s per core moves 40. Store is the floor, level 1 beats it.
    samples = [LevelSample(0, 5e9, 1.0), LevelSample(1, 100e6, 0.9),
               LevelSample(9, 20e6, 0.5)]
    assert choose_level(samples, 1e9 / 8, 2) == 1
    # The same levels on 10 Gbit/s: nothing compresses as fast as the link drains.
    assert choose_level(samples, 10e9 / 8, 2) == 0


def test_without_a_store_sample_the_link_itself_is_the_floor() -> None:
    # Only compressing levels measured, all slower than 1 Gbit/s raw: store is chosen.
    samples = [LevelSample(3, 30e6, 0.5), LevelSample(9, 10e6, 0.4)]
    assert uncompressed_rate(samples, 1e9 / 8, 2) == 1e9 / 8
    assert choose_level(samples, 1e9 / 8, 2) == 0
    # On 10 Mbit/s both outrun the link: level 9's smaller output (3.1 MB/s of logical
    # bytes against level 3's 2.5 and raw's 1.25) wins.
    assert choose_level(samples, 10e6 / 8, 2) == 9


def test_a_tie_goes_to_the_smaller_output_then_to_the_cheaper_level() -> None:
    # Both link-bound at the same rate only if their ratios are equal: then the cheaper.
    samples = [LevelSample(0, 1e10, 1.0), LevelSample(1, 1e9, 1.0)]
    assert choose_level(samples, 100e6 / 8, 2) == 0


_levels = st.lists(
    st.tuples(st.sampled_from([-5, -1, 1, 3, 6, 9, 12, 13, 14, 15, 16, 19]),
              st.floats(1e3, 2e10), st.floats(0.01, 1.0)),
    min_size=1, max_size=8, unique_by=lambda t: t[0])


@given(levels=_levels, store=st.one_of(st.none(), st.floats(1e6, 5e10)),
       link=st.floats(1e4, 1e10), cores=st.integers(1, 64),
       fixed=st.one_of(st.just(0.0), st.floats(1e-12, 1e-6)))
def test_the_chosen_level_never_moves_less_than_sending_uncompressed(
        levels: list[tuple[int, float, float]], store: float | None, link: float,
        cores: int, fixed: float) -> None:
    samples = [LevelSample(lv, speed, ratio) for lv, speed, ratio in levels]
    if store is not None:
        samples.insert(0, LevelSample(0, store, 1.0))
    chosen = choose_level(samples, link, cores, fixed)
    floor = uncompressed_rate(samples, link, cores, fixed)
    best = max(s.rate(link, cores, fixed) for s in samples)
    if chosen == 0:
        # store: measured and the fastest, or no compressing level reached the floor
        assert best <= floor
    else:
        pick = next(s for s in samples if s.level == chosen)
        assert pick.rate(link, cores, fixed) >= floor
        # and it is the fastest measured level
        assert pick.rate(link, cores, fixed) == best


def test_the_work_every_level_does_counts_against_a_cheap_level() -> None:
    # The fuller guest on a 10 Gbit/s link, 2 cores (bench hde, 2026-12-07): zstd -5
    # compressed ~700 MB/s per core at ratio 0.8, and the index and plan cost ~1.3 ns of
    # CPU per byte sent. Compression alone: 2 x 700 MB/s beats the link's 1,250 MB/s, so
    # -5 "wins"; the whole job at -5 moves 2 / (1/700e6 + 1.3e-9) = 0.73 GB/s, storing
    # min(2 / (1/10e9 + 1.3e-9), 1.25 GB/s) = 1.25 GB/s (measured: 0.8 against 1.5).
    samples = [LevelSample(0, 10e9, 1.0), LevelSample(-5, 700e6, 0.8)]
    link = 10e9 / 8
    assert choose_level(samples, link, 2) == -5
    assert choose_level(samples, link, 2, fixed_s_per_byte=1.3e-9) == 0
    assert samples[1].rate(link, 2, 1.3e-9) == pytest.approx(2 / (1 / 700e6 + 1.3e-9))
    assert uncompressed_rate(samples, link, 2, 1.3e-9) == link
    # On 1 Gbit/s the link binds storing, and -5's smaller output still pays.
    assert choose_level(samples, 1e9 / 8, 2, fixed_s_per_byte=1.3e-9) == -5
    # With no store sample, the floor is the link or what the fixed work allows.
    assert uncompressed_rate(samples[1:], link, 2, 4e-9) == pytest.approx(2 / 4e-9)
    with pytest.raises(ValueError, match="fixed_s_per_byte"):
        choose_level(samples, link, 2, fixed_s_per_byte=-1.0)


def test_each_level_is_timed_by_its_fastest_pass() -> None:
    # Three passes per level: an interrupted pass (5 s) does not count, the fastest does.
    durations = iter([5.0, 1.0, 3.0,   # store
                      9.0, 2.0, 4.0])  # level 1
    now = [0.0]
    state = {"start": True}

    def clock() -> float:
        if not state["start"]:
            now[0] += next(durations)
        state["start"] = not state["start"]
        return now[0]

    data = (Path(__file__).read_bytes() * 4)[: 32 * 1024]
    out = measure_ladder([data], 1.0, 1, clock, levels=(0, 1), passes=3)
    assert [s.level for s in out] == [0, 1]
    assert out[0].bytes_per_s_per_core == pytest.approx(len(data) / 1.0)
    assert out[1].bytes_per_s_per_core == pytest.approx(len(data) / 2.0)
    with pytest.raises(ValueError, match="passes"):
        measure_ladder([data], 1.0, 1, clock, levels=(0, 1), passes=0)


@given(mode=st.sampled_from(sorted(MODE_LEVELS)),
       durations=st.lists(st.floats(1e-6, 5.0), min_size=12, max_size=12),
       link=st.floats(1e4, 1e10), cores=st.integers(1, 8))
def test_measured_levels_always_include_store_and_the_pick_respects_it(
        mode: str, durations: list[float], link: float, cores: int) -> None:
    # Real data (this file's bytes, repeated: compressible), fake clock: each measured
    # level takes the drawn time.
    data = (Path(__file__).read_bytes() * 8)[: 64 * 1024]
    ticks = iter(durations)
    now = [0.0]
    state = {"start": True}

    def clock() -> float:
        if not state["start"]:
            now[0] += next(ticks)
        state["start"] = not state["start"]
        return now[0]

    samples = measure_levels([data], mode, link, cores, clock)
    assert samples[0].level == 0 and samples[0].ratio == 1.0
    assert [s.level for s in samples[1:]] == [lv for lv in MODE_LEVELS[mode] if lv != 0][
        : len(samples) - 1]
    chosen = choose_level(samples, link, cores)
    rate = {s.level: s.rate(link, cores) for s in samples}
    assert rate[chosen] >= rate[0]


def test_on_real_data_a_slow_link_compresses_and_a_fast_link_does_not_go_below_raw() -> None:
    data = b"".join(Path(mesh.hde.__file__).parent.joinpath(name).read_bytes()
                    for name in sorted(os.listdir(Path(mesh.hde.__file__).parent))
                    if name.endswith(".py"))
    slow = measure_levels([data], "internet", 10e6 / 8, 2, time.perf_counter)
    assert choose_level(slow, 10e6 / 8, 2) >= 1  # text over 10 Mbit/s: compress
    for link in (1e9 / 8, 100e9 / 8):
        fast = measure_levels([data], "internet", link, 2, time.perf_counter)
        chosen = choose_level(fast, link, 2)
        rate = {s.level: s.rate(link, 2) for s in fast}
        assert rate[chosen] >= rate[0]


def test_measure_levels_names_a_bad_mode_and_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="unknown link mode 'lan'"):
        measure_levels([b"x"], "lan", 1.0, 1, lambda: 0.0)
    with pytest.raises(ValueError, match="non-empty sample"):
        measure_levels([b""], "internet", 1.0, 1, lambda: 0.0)


# ---------------------------------------------------------------- the governor


def _run(gov: LevelGovernor, steps: int, dt: float, drain: float, encoded: float,
         backlog: float = 0.0, starved: bool = False) -> float:
    """Drive ``gov`` as a feed would: every ``dt`` the link drains ``drain`` bytes/s and
    the encoders add ``encoded`` bytes/s to the backlog. Returns the final backlog."""
    acked = 0.0
    for k in range(steps):
        now = k * dt
        out = min(backlog, drain * dt)
        acked += out
        backlog += encoded * dt - out
        gov.next_level(now, int(backlog), int(acked), starved)
    return backlog


def test_the_governor_climbs_while_the_encoders_outrun_the_link() -> None:
    gov = LevelGovernor(3)
    _run(gov, 40, 0.05, drain=12.5e6, encoded=60e6)
    assert gov.level > 3 and gov.steps and all(lv > 3 for _, lv in gov.steps)
    assert gov.drain is not None and abs(gov.drain - 12.5e6) < 1e6


def test_the_governor_steps_down_to_store_when_the_link_runs_dry() -> None:
    gov = LevelGovernor(16)
    _run(gov, 200, 0.05, drain=1e9, encoded=1e6)
    assert gov.level == 0  # never slower than sending uncompressed
    # one step at a time, down the whole ladder
    assert [lv for _, lv in gov.steps] == list(reversed(gov.ladder[:gov.ladder.index(16)]))


def test_a_backlog_low_for_want_of_plans_moves_nothing() -> None:
    gov = LevelGovernor(9)
    _run(gov, 100, 0.05, drain=12.5e6, encoded=0.0, backlog=1e6, starved=True)
    assert gov.level == 9 and not gov.steps


def test_a_backlog_a_wait_left_empty_is_refilled_before_any_step_down() -> None:
    """After the encoders waited for a plan the link has drained the backlog: the chunks
    right after (not waiting) find it low through no fault of the level. Only once a
    chunk's encode and a hold passed without a wait does a low backlog step down."""
    gov = LevelGovernor(9)
    _run(gov, 20, 0.05, drain=12.5e6, encoded=0.0, backlog=1e6, starved=True)  # to 0.95 s
    gov.encoded(9, 0.1, 1 << 20)  # a chunk takes 0.1 s here: the lead is LOW_S
    gov.encoded(6, 0.01, 1 << 20)
    grace = LevelGovernor.LOW_S + LevelGovernor.HOLD_S
    t = 1.0
    while t < 0.95 + grace - 0.01:
        assert gov.next_level(t, 0, 12_000_000, False) == 9
        t += 0.05
    assert gov.next_level(0.95 + grace + 0.01, 0, 12_000_000, False) < 9
    assert gov.steps


def test_the_governor_waits_between_steps_and_before_a_rate() -> None:
    gov = LevelGovernor(1)
    # no drain measured yet: the start level, whatever the backlog
    assert gov.next_level(0.0, 10**9, 0, False) == 1
    assert gov.next_level(0.1, 10**9, 10**6, False) == 1
    assert gov.next_level(0.25, 10**9, 2 * 10**6, False) == 3  # the rate is known
    assert gov.next_level(0.3, 10**9, 3 * 10**6, False) == 3  # held: HOLD_S
    assert gov.next_level(0.5, 10**9, 4 * 10**6, False) == 6


@given(start=st.sampled_from(LEVELS),
       events=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 10**9),
                                 st.integers(0, 10**8), st.booleans()), max_size=60))
def test_the_governor_stays_on_its_ladder(start: int,
                                          events: list[tuple[float, int, int, bool]]) -> None:
    gov = LevelGovernor(start)
    now, acked = 0.0, 0
    for dt, backlog, more, starved in events:
        now, acked = now + dt, acked + more
        level = gov.next_level(now, backlog, acked, starved)
        assert level in gov.ladder and level in (*LEVELS, start)
    for (t0, a), (t1, b) in zip(gov.steps, gov.steps[1:], strict=False):
        assert t1 - t0 >= LevelGovernor.HOLD_S
        assert abs(gov.ladder.index(a) - gov.ladder.index(b)) == 1


def test_measured_on_the_encoders_threads_a_rate_is_per_core_of_the_wall_clock() -> None:
    """Timed on ``cores`` threads at once, one second of wall clock for a level is
    ``cores`` seconds of encoder: a host whose other work holds a core shows it."""
    sample = [bytes(range(256)) * 1024] * 4
    ticks = iter(range(1000))

    def clock() -> float:
        return float(next(ticks))  # every reading one second after the last

    with ThreadPoolExecutor(2) as ex:
        par = measure_ladder(sample, 1e3, 2, clock, levels=(1,), executor=ex)
    ticks = iter(range(1000))
    one = measure_ladder(sample, 1e3, 2, clock, levels=(1,))
    total = sum(len(c) for c in sample)
    assert [s.level for s in par] == [0, 1] == [s.level for s in one]
    assert par[1].bytes_per_s_per_core == total / 2 and one[1].bytes_per_s_per_core == total
    assert par[1].ratio == one[1].ratio < 0.1


def test_no_step_down_to_a_level_that_does_not_encode_faster() -> None:
    """The encoders are slow for another reason than compression (a starved host, pages
    read through a sealed shadow): -5 measured no cheaper than 1, so the governor stays
    at 1 instead of sending bigger chunks for nothing."""
    gov = LevelGovernor(1)
    gov.encoded(-1, 0.10, 1 << 20)
    gov.encoded(1, 0.10, 1 << 20)
    _run(gov, 100, 0.05, drain=1e9, encoded=1e6)
    assert gov.level == 1 and not gov.steps
    gov.encoded(-1, 0.01, 1 << 20)
    gov.encoded(-1, 0.01, 1 << 20)  # now -1 is measured cheaper: worth the step
    assert gov.next_level(100.0, 0, 10**9, False) == -1


def _link(gov: LevelGovernor, seconds: float, link: float, produce: dict[int, float],
          backlog: float) -> tuple[float, float]:
    """Drive ``gov`` against a link of ``link`` bytes/s fed by encoders that produce
    ``produce[level]`` encoded bytes/s at each level (1 MiB chunks, 0.05 s steps; a
    level missing from ``produce`` produces as much as the highest one below it).
    Returns (seconds the link idled, the most backlog seen after the start)."""
    dt, drained, idle = 0.05, 0.0, 0.0
    rates = [produce.get(lv, 0.0) for lv in gov.ladder]
    for i in range(1, len(rates)):
        rates[i] = rates[i] or rates[i - 1]
    for k in range(int(seconds / dt)):
        now = k * dt
        level = gov.next_level(now, int(backlog), int(drained), False)
        made = rates[gov.ladder.index(level)] * dt
        gov.encoded(level, (1 << 20) / max(made / dt, 1.0), 1 << 20)
        backlog += made
        out = min(backlog, link * dt)
        idle += dt - out / link
        backlog -= out
        drained += out
    return idle, backlog


def test_a_shrinking_backlog_does_not_climb_and_the_link_never_idles() -> None:
    """The quiet run of 2026-12-07 21:00 (task livetbf): a window's worth of frames
    encoded at 9 drained while the governor climbed to 19 on the size of the backlog,
    and the link then ran at 65 %. At 12 and above these encoders fall behind the link:
    the governor must not climb while the backlog shrinks, and step back down in time."""
    link = 12.5e6
    produce = {9: 20e6, 12: 10e6, 13: 8e6, 14: 6e6, 16: 4e6, 19: 1.5e6}
    gov = LevelGovernor(9)
    idle, _ = _link(gov, 30.0, link, produce, backlog=60e6)
    assert idle == 0.0
    assert max(gov.ladder.index(lv) for _, lv in gov.steps) <= gov.ladder.index(12)
    # it still uses the spare CPU: back and forth between 9 and 12 at the link's pace
    assert {lv for _, lv in gov.steps} == {9, 12}


def test_a_climb_waits_for_the_trend_at_the_new_level() -> None:
    gov = LevelGovernor(3)
    assert gov.next_level(0.0, 50_000_000, 0, False) == 3
    assert gov.next_level(0.25, 50_000_000, 3_000_000, False) == 6  # steady: climb
    # right after the step the trend is the old level's: none yet
    assert gov.trend is None
    # a chunk at 6 takes 0.4 s here: the chunks begun before the step are still 3's
    gov.encoded(6, 0.4, 1 << 20)
    assert gov.next_level(0.5, 50_000_000, 6_000_000, False) == 6
    # the backlog shrank at 6: no climb however large it still is
    assert gov.next_level(0.75, 46_000_000, 9_000_000, False) == 6
    assert gov.trend is not None and gov.trend < 0
