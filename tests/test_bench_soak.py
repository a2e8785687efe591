"""``dwcp bench soak``: the slope estimator on known data, and a short run of the real
thing (four ``dwcp node`` processes, migrations, ledger load, a SIGTERM restart and a
``kill -9`` restart inside ~25 s) whose JSON has the documented shape and whose samples
move. The hour-long run is ``make``-less and documented in docs/BENCHMARKS.md; a
10-minute one is marked slow."""

from __future__ import annotations

import argparse

import pytest

from bench.soak import ERROR_EVENTS, pooled_slope, record_bytes, register, run_soak


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["soak", *argv])


def test_pooled_slope_ignores_the_jump_of_a_restart() -> None:
    # two lifetimes of one process with the same slope (2 per unit) and different levels:
    # a plain fit over both would see the drop at the restart
    first = [(float(t), 100.0 + 2 * t) for t in range(10)]
    second = [(float(t), 40.0 + 2 * t) for t in range(10, 20)]
    assert pooled_slope([first, second]) == pytest.approx(2.0)
    assert pooled_slope([[(0.0, 1.0)], [(5.0, 3.0)]]) is None  # no segment has two times
    flat = [(float(t), 7.0) for t in range(5)]
    assert pooled_slope([flat]) == 0.0


def test_record_bytes_are_measured() -> None:
    sizes = record_bytes(200)
    # a RequestRecord's fields alone (a 32-char nonce, a 32-byte digest, ...) are over 100 B
    assert 100 < sizes["request_memory"] < 10_000, sizes
    assert 100 < sizes["migration_memory"] < 10_000, sizes
    assert 50 < sizes["request_wire"] < 1000 and 50 < sizes["migration_wire"] < 1000, sizes
    # an ended session kept by a node: the session object with its layout, authorization
    # and timers, its last progress and outcome (3.5 KB when measured)
    assert 1000 < sizes["session_memory"] < 20_000, sizes
    assert 300 < sizes["session_wire"] < 2000, sizes


def test_error_events_are_documented_events() -> None:
    from pathlib import Path
    ops = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    missing = [e for e in ERROR_EVENTS if f"`{e}`" not in ops]
    assert not missing, f"not in docs/operations.md's event table: {missing}"


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--minutes", "0")
    assert args.func(args) == 2
    assert "--minutes must be positive" in capsys.readouterr().err
    args = _args("--steady", "dc9")
    assert args.func(args) == 2
    assert "--steady dc9: expected dc1..dc4 or none" in capsys.readouterr().err
    assert _args("--steady", "none").steady is None


@pytest.mark.processes
@pytest.mark.exclusive  # kill -9 of real nodes (tests/harness/groups.py)
def test_short_soak_samples_restarts_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    doc = run_soak(_args("--minutes", "0.4", "--sample-every", "3", "--restart-every", "0.15",
                         "--warmup-minutes", "0.05", "--migrate-every", "1", "--json",
                         "--heap-report", "0"))
    for key in ("rss_mib_per_hour", "fds_per_hour", "tasks_per_hour", "disk_mib_per_hour",
                "cpu_percent_per_hour", "per_node", "migrations", "commands", "restarts",
                "errors", "bounds", "checks", "ok", "samples", "warmup"):
        assert key in doc, key
    assert doc["errors"] == [] and doc["problems"] == [], (doc["errors"], doc["problems"])
    assert doc["migrations"]["committed"] > 0 and doc["migrations"]["failed"] == 0, doc
    assert doc["commands"]["committed"] > 0 and doc["commands"]["refused"] == 0, doc
    # a restart inside: SIGTERM first (exit 0), then kill -9, each back and ready
    hows = [r["how"] for r in doc["restarts"]]
    assert hows[:1] == ["SIGTERM"], doc["restarts"]
    assert doc["restarts"][0]["exit_code"] == 0 and doc["restarts"][0]["ready_after_s"]
    samples = doc["samples"]
    assert {s["dc"] for s in samples} == {"dc1", "dc2", "dc3", "dc4"}
    assert len({s["t_s"] for s in samples}) >= 4
    assert any(s["incarnation"] == 1 for s in samples), "no sample of a restarted node"
    # the samples move: time, the nodes' memory, the disk the VMs and the ledger take
    for key in ("t_s", "rss_mib", "cpu_s", "data_dir_mib", "sqlite_mib"):
        assert len({s[key] for s in samples}) > 1, key
    assert all(s["fds"] > 0 and s["rss_mib"] > 10 for s in samples)
    assert all(isinstance(s["trio_tasks"], int) and s["trio_tasks"] > 5 for s in samples
               if s["trio_tasks"] is not None)
    assert sum(s["trio_tasks"] is not None for s in samples) >= len(samples) // 2
    for key in ("rss_mib_per_hour", "fds_per_hour", "tasks_per_hour", "disk_mib_per_hour"):
        assert isinstance(doc[key], float), key
        assert key in doc["bounds"] and key in doc["checks"]
    assert "soak " in capsys.readouterr().err  # the progress lines
    # --heap-report: every node answered the soak's SIGUSR2 with a heap_report line
    for dc, reports in doc["heap_reports"].items():
        assert reports and all(r["anon_mib"] > 5 and r["objects"] > 1000 for r in reports), dc
        assert all(r["malloc_in_use_mib"] > 1 for r in reports), dc
    assert all(s["anon_mib"] > 5 for s in samples)
    # dc4 (--steady's default) is never restarted: its slope is over one process
    assert "dc4" not in {r["dc"] for r in doc["restarts"]}
    # each node's persisted migration records, counted in its node.sqlite3
    assert all(isinstance(s["migration_rows"], int) for s in samples)
    assert doc["migration_rows"]["max"] >= 1 and doc["checks"]["migration_rows_within_retention"]
    steady = doc["steady"]
    assert steady["dc"] == "dc4" and steady["samples"] >= 2, steady
    assert isinstance(steady["rss_mib_per_hour"], float), steady
    assert doc["checks"]["caches_measured"] and doc["checks"]["caches_within_caps"], doc
    assert "steady_rss_mib_per_hour" in doc["checks"]
    # every cache measured in the nodes, its size once full from its bytes per entry
    caches = doc["caches_mib"]
    for name in ("verifier", "signature_memo", "request_book", "ended_sessions"):
        assert caches[name]["full_mib"] > 0 and caches[name]["bytes_per_entry"] > 50, caches
    assert caches["ledger_migrations"]["cap"] is None
    terms = doc["bounds"]["terms"]
    assert terms["allowance_mib"] == pytest.approx(
        sum(c["full_mib"] for c in caches.values() if c["full_mib"] is not None), abs=0.01)
    assert terms["ledger_record_bytes"] == caches["ledger_migrations"]["bytes_per_entry"]


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.exclusive
@pytest.mark.timeout(1200)
def test_ten_minute_soak_stays_within_its_bounds() -> None:
    doc = run_soak(_args("--minutes", "10", "--sample-every", "20", "--restart-every", "2",
                         "--warmup-minutes", "2", "--json"))
    assert doc["ok"], {k: doc[k] for k in ("checks", "errors", "problems", "bounds")}
