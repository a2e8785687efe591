"""PBFT scenarios in the simulator: every scenario over a few seeds, the Byzantine
swarm over 200 seeds at f = 1 and a sample at f = 2 here, and over 10,000 seeds each
(f = 1 and f = 2) in ``make chaos`` (``dwcp sim sweep pbft-swarm``, Makefile). A
failure names the command that replays it."""

from __future__ import annotations

import pytest

import sim.scenarios  # noqa: F401  (registers the scenarios)
from sim.scenarios import registry, run_scenario

SCENARIOS = sorted(n for n in registry if n.startswith("pbft-"))


def _sweep(name: str, seeds: range, nodes: int | None = None) -> None:
    failed = []
    for seed in seeds:
        result = run_scenario(name, seed, nodes)
        if not result.ok:
            failed.append(f"{result.replay()}: {[v.message for v in result.violations]}")
    assert not failed, "\n".join(failed[:10])


def test_every_issue_scenario_is_registered() -> None:
    expected = {
        "pbft-normal", "pbft-primary-crash", "pbft-minority-partition",
        "pbft-majority-partition", "pbft-equivocating-primary", "pbft-forged-signatures",
        "pbft-replay", "pbft-corrupt-cbor", "pbft-silent-primary", "pbft-forged-certificates",
        "pbft-stale-checkpoints", "pbft-view-flood", "pbft-twins", "pbft-swarm",
    }
    assert expected <= set(SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_f1(name: str) -> None:
    _sweep(name, range(5))


@pytest.mark.parametrize("name", ["pbft-swarm", "pbft-equivocating-primary", "pbft-twins",
                                  "pbft-forged-certificates"])
def test_scenario_f2(name: str) -> None:
    _sweep(name, range(2), nodes=7)


def test_equivocating_primary_is_convicted_and_replaced() -> None:
    result = run_scenario("pbft-equivocating-primary", 3)
    assert result.ok and result.metrics["convicted_primary0"] is True
    assert all(v >= 1 for m, v in result.metrics["pbft"]["views"].items() if m != "n00")


def test_twins_are_convicted_by_their_conflicting_proposals() -> None:
    result = run_scenario("pbft-twins", 2)
    assert result.ok and result.metrics["convicted_primary0"]


@pytest.mark.parametrize(("name", "counter"), [
    ("pbft-forged-certificates", "forged_prepared_certificates"),
    ("pbft-view-flood", "forged_prepared_certificates"),
    ("pbft-stale-checkpoints", "invalid_view_changes"),
    ("pbft-forged-signatures", "invalid_signatures"),
    ("pbft-corrupt-cbor", "invalid_signatures"),
    ("pbft-silent-primary", "view_changes_completed"),
    ("pbft-minority-partition", "stable_checkpoints"),
])
def test_attacks_are_exercised_and_counted(name: str, counter: str) -> None:
    result = run_scenario(name, 1)
    assert result.ok and result.metrics["pbft"]["counted"][counter] > 0


def test_runs_replay_exactly() -> None:
    a = run_scenario("pbft-swarm", 11)
    b = run_scenario("pbft-swarm", 11)
    assert a.trace_hash == b.trace_hash and a.events == b.events


def test_receivers_get_the_same_run_whether_frames_are_decoded_or_handed_over() -> None:
    # PbftCluster hands receivers the sent envelopes (World.decode_frames = False); the
    # decoding path must give the same run, Byzantine frames (always decoded) included.
    for seed in (4, 11):
        fast = run_scenario("pbft-swarm", seed)
        slow = run_scenario("pbft-swarm", seed, params={"decode_frames": True})
        assert fast.ok and slow.ok
        assert (fast.trace_hash, fast.events) == (slow.trace_hash, slow.events)


@pytest.mark.parametrize("first", [0, 50, 100, 150])
def test_byzantine_swarm_200_seeds_f1(first: int) -> None:
    """Seeds 0-199 in four parts of 50, so pytest-xdist's workers share them."""
    _sweep("pbft-swarm", range(first, first + 50))


def test_byzantine_swarm_f2() -> None:
    _sweep("pbft-swarm", range(2, 30), nodes=7)
