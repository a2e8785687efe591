"""``dwcp bench channel``: a small run prints the figures the benchmark promises."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import channel
from mesh.channel import ChannelError, SecureChannel


def test_channel_bench_prints_positive_figures(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    channel.register(parser.add_subparsers())
    args = parser.parse_args(["channel", "--json", "--size-mib", "8", "--frame-kib", "256",
                              "--amst-digest"])  # fmt: skip
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("raw_tcp_MBps", "channel_MBps", "ratio", "raw_tcp_seconds", "channel_seconds",
                "amst_link_MBps", "amst_link_seconds", "amst_link_sha256_MBps",
                "amst_link_sha256_cpu_seconds"):
        assert result[key] > 0, key
    # AMST's send path runs at AMST's chunk size whatever --frame-kib says
    assert result["amst_link_chunk_bytes"] == 1024 * 1024 and result["amst_link_chunks"] == 8
    assert result["bytes"] == 8 * 1024 * 1024 and result["frames"] == 32
    assert result["ratio"] == pytest.approx(
        result["channel_MBps"] / result["raw_tcp_MBps"], rel=0.05
    )


@pytest.mark.parametrize("method", ["send_into", "receive_frame_into"])
def test_a_failing_crypto_thread_ends_the_run_with_its_error(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The long-lived crypto threads are told to stop when their trio side fails, and
    their own failures reach the caller: a broken frame ends the run, never hangs it."""
    original = getattr(SecureChannel, method)
    calls = []

    def failing(self: SecureChannel, data: bytes, out: bytearray) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise ChannelError("tampered", "injected by the test")
        return original(self, data, out)

    monkeypatch.setattr(SecureChannel, method, failing)
    with pytest.raises(BaseExceptionGroup) as err:
        channel.measure(16 * 1024 * 1024, 256 * 1024)
    assert err.group_contains(ChannelError, match="injected by the test")
