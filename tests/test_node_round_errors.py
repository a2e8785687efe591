"""A failed round is a failed round however the v3 data plane raises it."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from federation.dataplane.v3_source import RoundFailed, V3RoundSender
from federation.dataplane.v3_source import round_error as _round_error
from federation.migration.round_events import V3Failed, V3Prepare


def test_a_round_error_wrapped_by_a_nursery_is_still_a_round_error() -> None:
    cut = RoundFailed("AMST to dc4: transfer cut")
    assert _round_error(cut) is cut
    assert _round_error(ExceptionGroup("nursery", [cut])) is cut
    assert _round_error(ExceptionGroup("outer", [ExceptionGroup("inner", [cut])])) is cut


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        ExceptionGroup("nursery", [ValueError("a bug")]),
        ExceptionGroup("nursery", [RoundFailed("cut"), ValueError("a bug")]),
    ],
)
def test_anything_else_is_not_swallowed(exc: BaseException) -> None:
    assert _round_error(exc) is None


def _stop_while_a_stream_raises(error: BaseException, reports: list[Any]) -> None:
    """Run a round whose second stream raises ``error`` as it is cancelled, inside a
    "node" cancelled (SIGTERM) while the round runs."""

    class Stopped(V3RoundSender):
        async def _run(self) -> None:
            async def stream() -> None:
                try:
                    await trio.sleep_forever()
                finally:  # e.g. the send on the closing link fails as the node stops
                    raise error

            async with trio.open_nursery() as streams:
                streams.start_soon(trio.sleep_forever)
                streams.start_soon(stream)

    sender = Stopped(V3Prepare("m1", "vm1", 1, "dc3", 1), None,  # type: ignore[arg-type]
                     None, send=lambda p, m: True, connect=None,  # type: ignore[arg-type]
                     new_channel=lambda: None,  # type: ignore[arg-type,return-value]
                     choose_level=lambda s: ("", 0), report=reports.append)

    async def node() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run)
            await trio.sleep(0.01)
            nursery.cancel_scope.cancel()  # SIGTERM

    trio.run(node)


def test_a_round_failing_while_the_node_stops_fails_the_round_not_the_node() -> None:
    """A stream of the round fails (the control link went) while the node is stopping:
    the round's nursery raises the round error beside the cancellation. The round is
    reported failed and the cancellation ends at the scope it belongs to; nothing else
    comes out (make netns-chaos seed 100: the round error came out alone and the node
    exited 1 on SIGTERM)."""
    reports: list[Any] = []
    _stop_while_a_stream_raises(RoundFailed("the control link to dc3 is down or full"),
                                reports)
    assert len(reports) == 1 and isinstance(reports[0], V3Failed)
    assert "control link to dc3" in reports[0].reason


def test_a_bug_beside_a_cancellation_is_still_raised() -> None:
    reports: list[Any] = []
    with pytest.raises(BaseExceptionGroup) as info:
        _stop_while_a_stream_raises(ValueError("a bug"), reports)
    assert info.group_contains(ValueError)
    assert reports == []
