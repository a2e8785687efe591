"""AMST's sans-I/O cores over a modelled wide-area path (sim/scenarios/amst_streams.py):
the stream count follows the bandwidth-delay product, and a cut stream's chunks are
re-sent on the others. Also the ``amst-streams`` scenario on the simulator's clock."""

from __future__ import annotations

import pytest

from sim.scenarios import run_scenario
from sim.scenarios.amst_streams import PathModel


def test_stream_count_climbs_to_fill_a_long_fat_path() -> None:
    # 4 Gbit/s at 50 ms RTT: one stream's window gives 3 MiB / 50 ms = 63 MB/s, the path
    # takes 500 MB/s, so it needs 8 streams; hybrid mode starts at 4.
    path = PathModel("hybrid", bandwidth=500e6, rtt=0.05, chunks=6000)
    path.run(until=60.0)
    assert path.finished
    assert sorted(path.delivered) == list(range(6000))
    assert path.streams_over_time[50][1] == 4  # the mode's start
    assert path.sender.controller.target == 8  # climbed to the BDP's need (hybrid max)
    assert path.mean_rate(path.now - 2.0, path.now - 0.5) > 0.9 * 500e6


def test_stream_count_stays_low_where_more_streams_do_not_pay() -> None:
    # 200 Mbit/s at 20 ms: one stream's window alone could move 157 MB/s, so the 25 MB/s
    # path is bandwidth-bound; a probe gains nothing and is dropped again.
    path = PathModel("hybrid", bandwidth=25e6, rtt=0.02, chunks=400)
    path.run(until=60.0)
    assert path.finished
    assert max(t for t, _ in path.sender.controller.history) <= 5
    assert path.sender.controller.target == 4
    assert all(n <= 5 for _, n in path.streams_over_time)


@pytest.mark.parametrize("victim", [0, 2])
def test_cut_stream_chunks_are_resent_and_the_transfer_recovers(victim: int) -> None:
    path = PathModel("internet", bandwidth=125e6, rtt=0.1, chunks=1500)
    path.run(until=3.0)
    delivered_before = len(path.delivered)
    path.run(until=120.0, cut=(3.0, victim))
    assert path.finished
    assert sorted(path.delivered) == list(range(1500))  # each exactly once
    assert path.sender.resent >= 1
    assert all(n <= 2 for n in path.sender.sends.values())
    assert delivered_before > 0
    # throughput recovers after the cut: the last second runs near the link rate
    assert path.mean_rate(path.now - 1.5, path.now - 0.5) > 0.8 * 125e6


@pytest.mark.parametrize("seed", [1, 2])
def test_scenario_on_the_simulator_clock_recovers_from_a_seeded_cut(seed: int) -> None:
    params = {"chunks": 2500, "bandwidth": 250e6}
    result = run_scenario("amst-streams", seed, params=params)
    assert result.ok, result.violations
    assert result.metrics["amst_cut_stream"] is not None
    assert result.metrics["amst_resent"] >= 1
    again = run_scenario("amst-streams", seed, params=params)
    assert again.trace_hash == result.trace_hash  # the same seed replays exactly
