"""The crash-point search (sim/scenarios/pbft_crashpoints.py) in ``make test``: 200 seeds
at f = 1 (almost four walks over every focus and depth, in four parts) and a sample at
f = 2; ``make chaos`` sweeps 10,000 seeds of each (``dwcp sim sweep pbft-crashpoints``).
A failure names the command that replays it."""

from __future__ import annotations

from collections import Counter

import pytest

import sim.scenarios  # noqa: F401  (registers the scenarios)
from sim.scenarios import run_scenario
from sim.scenarios.pbft_crashpoints import CRASH_POINTS, DEPTHS, crash_point


def _sweep(seeds: range, nodes: int | None = None) -> Counter[str]:
    """Run the seeds; fail with their replay lines if any run fails; count what the
    crash points hit ("record step", see CrashPoints.hit)."""
    failed, hit = [], Counter[str]()
    for seed in seeds:
        result = run_scenario("pbft-crashpoints", seed, nodes)
        if not result.ok:
            failed.append(f"{result.replay()}: {[v.message for v in result.violations]}")
        for where in result.metrics["crash_point"]["hit"]:
            hit[where.split(" ", 1)[1]] += 1
    assert not failed, "\n".join(failed[:10])
    return hit


def test_seeds_walk_every_focus_and_depth() -> None:
    points = [crash_point(seed) for seed in range(CRASH_POINTS)]
    assert len(set(points)) == CRASH_POINTS
    assert sorted(points) == sorted((f, k) for f, depth in DEPTHS.items()
                                    for k in range(1, depth + 1))
    assert crash_point(CRASH_POINTS + 5) == crash_point(5)


def test_a_pinned_crash_point_replays_exactly() -> None:
    params = {"focus": "new-view", "k": 2}
    a = run_scenario("pbft-crashpoints", 3, params=params)
    b = run_scenario("pbft-crashpoints", 3, params=params)
    assert a.ok and a.trace_hash == b.trace_hash
    assert a.metrics["crash_point"]["focus"] == "new-view"
    assert "focus=" in a.replay() and "--param k=2" in a.replay()


@pytest.mark.parametrize("first", [0, 50, 100, 150])
def test_crash_points_200_seeds_f1_cover_every_kind_of_write(first: int) -> None:
    """Seeds 0-199 in four parts of 50 (so pytest-xdist's workers share them). 50
    consecutive seeds miss at most 2 of a walk's 52 crash points, so each part covers
    every focus, and each must hit every kind of write on its own."""
    hit = _sweep(range(first, first + 50))
    records = {where.split()[0] for where in hit}
    steps = {where.split()[1] for where in hit}
    # every kind of synced write the replica makes was a crash point, and so were the
    # writes made while installing a NEW-VIEW, a VIEW-CHANGE and a state transfer
    assert {"pre-prepare", "prepared", "view-change", "new-view", "checkpoint"} <= records, hit
    assert {"new-view", "view-change", "installing-state", "normal-case"} <= steps, hit


def test_crash_points_f2() -> None:
    hit = _sweep(range(30), nodes=7)
    assert sum(hit.values()) >= 25, hit


@pytest.mark.parametrize("focus", sorted(DEPTHS))
def test_each_focus_fires_its_crash_points(focus: str) -> None:
    result = run_scenario("pbft-crashpoints", 11, params={"focus": focus, "k": 1})
    assert result.ok, result.replay()
    assert result.metrics["crash_point"]["hit"], result.metrics["crash_point"]
