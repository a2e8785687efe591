"""PBFT across real processes: replicas killed with SIGKILL mid-run — also the primary
under load and then backups during the view change that replaces it — restart from
their SQLite logs, catch up, and every ledger agrees."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.consensus import Cluster
from tests.harness.waiting import poll_until

#: Real replicas with sub-second view timeouts, killed with SIGKILL: never beside another
#: such test under xdist (tests/harness/groups.py).
pytestmark = pytest.mark.exclusive

#: The replicas rewrite their status file every 0.2 s (bench/consensus.py).
STATUS_EVERY = 0.2


def _settle(c: Cluster, timeout: float) -> dict[str, dict[str, object]]:
    """Every replica's status once all show the same ledger, quiet (a digest is only
    reported once execution stood still for a status period)."""

    def quiet_and_equal() -> dict[str, dict[str, object]] | None:
        states = {m: c.status(m) or {} for m in c.names}
        if all(s.get("digest") for s in states.values()) and len(
                {(s["last_exec"], s["digest"]) for s in states.values()}) == 1:
            return states
        return None

    return poll_until(quiet_and_equal, "every ledger quiet and the same", timeout,
                      every=STATUS_EVERY / 2)


@pytest.mark.processes
def test_kill_9_replica_restarts_catches_up_and_ledgers_agree(tmp_path: Path) -> None:
    c = Cluster(4, tmp_path, view_timeout=1.0)
    try:
        c.start_all({"n01": (8, 3.0), "n03": (8, 3.0)})
        c.go(c.names)
        poll_until(lambda: (c.status("n02") or {}).get("last_exec", 0) >= 5,
                   "n02 executing some commands before the kill", 30, every=STATUS_EVERY / 2)
        c.kill("n02")
        before = c.status("n02") or {}
        c.start("n02")  # same data directory: it recovers from its SQLite log
        c.wait_ready(["n02"])
        c.go(["n02"])
        results = [c.result(m, 60.0) for m in ("n01", "n03")]
        states = _settle(c, 30.0)
    finally:
        c.stop()
    assert all(r["latencies"] for r in results)
    assert all(s.get("digest") for s in states.values()), states  # every ledger quiet
    assert len({(s["last_exec"], s["digest"]) for s in states.values()}) == 1, states
    assert int(states["n02"]["last_exec"]) > int(before["last_exec"])  # it kept up after


@pytest.mark.processes
def test_bench_smoke_a_short_loaded_run_and_the_link_phase_report_real_figures() -> None:
    from bench.consensus import _link_hop, _loaded_run

    r = _loaded_run(4, 4, 1.0)
    assert r.rate > 0 and r.latencies
    if r.cpu_us_per_commit is not None:  # None only without /proc
        assert r.cpu_us_per_commit > 0
    assert r.mean_batch is not None and r.mean_batch >= 1.0
    assert r.signed_in_run == 0, "the operator requests were signed before the run"
    hop, cpu = _link_hop(0.5)
    assert 0 < hop < 0.5 and cpu > 0


def _view(c: Cluster, name: str) -> int:
    return int((c.status(name) or {}).get("view", 0))


def _executed(c: Cluster, name: str) -> int:
    return int((c.status(name) or {}).get("last_exec", 0))


def _started_view_changes(c: Cluster, name: str) -> int:
    return int(((c.status(name) or {}).get("metrics") or {}).get("view_changes_started", 0))


@pytest.mark.processes
@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_primary_under_load_then_backups_during_the_view_change(
        tmp_path: Path, seed: int) -> None:
    """The primary n00 is killed at a random point of the load every backup puts on the
    ledger; as soon as a backup starts the view change, one of them (the new primary n01
    half the time) is killed and n00 and it come back; at a random point after the view
    change another backup is killed and restarted. Every node restarts from its own data
    directory; at the end all four ledgers agree."""
    rng = random.Random(seed)
    c = Cluster(4, tmp_path, view_timeout=0.5)
    look = STATUS_EVERY / 4
    try:
        # 20 s of load: the kills below all come while commands still flow
        c.start_all({m: (8, 20.0) for m in ("n01", "n02", "n03")})
        c.go(c.names)
        at = rng.randint(5, 20)
        poll_until(lambda: _executed(c, "n01") >= at, f"n01 executing {at} batches", 30,
                   every=look)
        c.kill("n00")
        poll_until(lambda: any(_started_view_changes(c, m) for m in ("n01", "n02", "n03")),
                   "a backup starting a view change", 30, every=look)
        first = "n01" if rng.random() < 0.5 else rng.choice(["n02", "n03"])
        c.kill(first)
        c.start("n00")
        c.start(first)
        c.wait_ready(["n00", first])  # READY once linked to every peer
        poll_until(lambda: max(_view(c, m) for m in c.names) >= 1,
                   "the federation past view 0", 30, every=look)
        second = rng.choice([m for m in ("n01", "n02", "n03") if m != first])
        at = _executed(c, second) + rng.randint(1, 5)
        poll_until(lambda: _executed(c, second) >= at, f"{second} executing batch {at}", 30,
                   every=look)
        c.kill(second)
        c.start(second)
        c.wait_ready([second])
        c.go(["n00", first, second])  # the restarted nodes load nothing (window 0)
        states = _settle(c, 90.0)
    finally:
        c.stop()
    assert all(s.get("digest") for s in states.values()), states  # every ledger quiet
    assert len({(s["last_exec"], s["digest"]) for s in states.values()}) == 1, states
    assert int(states["n00"]["last_exec"]) >= 5
    assert max(int(s["view"]) for s in states.values()) >= 1
