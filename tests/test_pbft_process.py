"""PBFT across real processes: replicas killed with SIGKILL mid-run — also the primary
under load and then backups during the view change that replaces it — restart from
their SQLite logs, catch up, and every ledger agrees."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.consensus import Cluster


def _settle(c: Cluster, timeout: float) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        states = {m: c.status(m) for m in c.names}
        done = all(s is not None and s["digest"] is not None for s in states.values()) and len(
            {(s["last_exec"], s["digest"]) for s in states.values() if s is not None}) == 1
        if done or time.monotonic() > deadline:
            return {m: s or {} for m, s in states.items()}
        time.sleep(0.1)


@pytest.mark.processes
def test_kill_9_replica_restarts_catches_up_and_ledgers_agree(tmp_path: Path) -> None:
    c = Cluster(4, tmp_path, view_timeout=1.0)
    try:
        c.start_all({"n01": (8, 3.0), "n03": (8, 3.0)})
        c.go(c.names)
        deadline = time.monotonic() + 30
        while (c.status("n02") or {}).get("last_exec", 0) < 5:  # n02 has executed some
            assert time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.05)
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
    hop, cpu = _link_hop(0.5)
    assert 0 < hop < 0.5 and cpu > 0


def _wait(what: str, holds: Callable[[], bool], timeout: float) -> None:
    """Poll the status files (rewritten every 0.2 s by each node) until ``holds``."""
    deadline = time.monotonic() + timeout
    while not holds():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def _view(c: Cluster, name: str) -> int:
    return int((c.status(name) or {}).get("view", 0))


def _started_view_changes(c: Cluster, name: str) -> int:
    return int(((c.status(name) or {}).get("metrics") or {}).get("view_changes_started", 0))


@pytest.mark.processes
@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_primary_under_load_then_backups_during_the_view_change(
        tmp_path: Path, seed: int) -> None:
    """The primary n00 is killed while every backup loads the ledger; while the backups
    change view, one of them (the new primary n01 half the time) is killed at a random
    moment and n00 comes back; then another backup is killed and restarted. Every node
    restarts from its own data directory; at the end all four ledgers agree."""
    rng = random.Random(seed)
    c = Cluster(4, tmp_path, view_timeout=0.5)
    load = 10.0
    try:
        c.start_all({m: (8, load) for m in ("n01", "n02", "n03")})
        c.go(c.names)
        _wait("n01 executed some commands", lambda: int(
            (c.status("n01") or {}).get("last_exec", 0)) >= 5, 30.0)
        time.sleep(rng.uniform(0.0, 0.5))  # a random moment of the load (waiting, not work)
        c.kill("n00")
        _wait("a backup started a view change",
              lambda: any(_started_view_changes(c, m) for m in ("n01", "n02", "n03")), 30.0)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the view change
        first = "n01" if rng.random() < 0.5 else rng.choice(["n02", "n03"])
        c.kill(first)
        c.start("n00")
        time.sleep(rng.uniform(0.0, 0.5))
        c.start(first)
        c.wait_ready(["n00", first])  # READY once linked to every peer
        _wait("the federation moved past view 0", lambda: max(
            _view(c, m) for m in c.names) >= 1, 30.0)
        second = rng.choice([m for m in ("n01", "n02", "n03") if m != first])
        time.sleep(rng.uniform(0.0, 0.5))
        c.kill(second)
        time.sleep(rng.uniform(0.0, 0.5))
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
