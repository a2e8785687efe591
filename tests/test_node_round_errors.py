"""A failed round is a failed round however the v3 data plane raises it."""

from __future__ import annotations

import pytest

from federation.dataplane.v3_source import RoundFailed
from federation.dataplane.v3_source import round_error as _round_error


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
