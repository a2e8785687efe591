"""``dwcp bench channel``: a small run prints the figures the benchmark promises."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import channel


def test_channel_bench_prints_positive_figures(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    channel.register(parser.add_subparsers())
    args = parser.parse_args(["channel", "--json", "--size-mib", "8", "--frame-kib", "256"])
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("raw_tcp_MBps", "channel_MBps", "ratio", "raw_tcp_seconds", "channel_seconds"):
        assert result[key] > 0, key
    assert result["bytes"] == 8 * 1024 * 1024 and result["frames"] == 32
    assert result["ratio"] == pytest.approx(
        result["channel_MBps"] / result["raw_tcp_MBps"], rel=0.05
    )
