"""``dwcp bench sim``: the figures are measured on a real run and are consistent."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.sim import measure, register


def test_bench_sim_measures_a_real_run() -> None:
    figures = measure(nodes=4, seconds=30.0)
    assert figures["nodes"] == 4 and figures["sim_seconds"] == 30.0
    assert figures["events"] > 100 and figures["messages"] > 50
    assert figures["speedup"] == pytest.approx(30.0 / figures["wall_seconds"], rel=0.01)
    assert figures["events_per_s"] == pytest.approx(
        figures["events"] / figures["wall_seconds"], rel=0.01)
    assert "Membership" in figures["core"] or "fallback" in figures
    # Same seed, same run.
    assert measure(nodes=4, seconds=30.0)["trace_hash"] == figures["trace_hash"]


def test_bench_sim_cli_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(["sim", "--json", "--nodes", "3", "--seconds", "5"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("nodes", "sim_seconds", "wall_seconds", "speedup", "events_per_s", "core"):
        assert key in out
