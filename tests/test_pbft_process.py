"""PBFT across real processes: a replica killed with SIGKILL mid-run restarts from
its SQLite log, catches up, and every ledger agrees."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.consensus import Cluster
from tests.harness.waiting import poll_until

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
    hop, cpu = _link_hop(0.5)
    assert 0 < hop < 0.5 and cpu > 0
