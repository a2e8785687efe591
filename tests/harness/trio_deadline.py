"""A wall-clock deadline for trio tests that ends the trio run cleanly.

pytest-timeout's default method raises its ``Failed: Timeout`` from a SIGALRM handler,
wherever the main thread happens to be: inside a trio test that is usually trio's own
run loop, so the run is abandoned half-way ("Trio guest run got abandoned without
properly finishing"). Its wakeup socket is closed while worker threads of
``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` (the AMST links' crypto, see
mesh/runtime/amst_stream.py) and async-generator finalizers still hold the run's token:
they then report to a closed run (``OSError: [Errno 9] Bad file descriptor``) in the
middle of the next tests, and one such run ended in a pytest INTERNALERROR (a CPython
SystemError while formatting the traceback).

:func:`deadline_run` is handed to pytest-trio as the ``run`` of every trio test
(tests/conftest.py): a timer thread cancels the test's cancel scope a little before
pytest-timeout would fire, trio unwinds every task and reaps its threads, and the test
fails naming its deadline. pytest-timeout stays as the backstop for code that never
yields back to trio. The deadline is real time, whatever clock the test runs under
(``autojump_clock`` makes trio's own ``fail_after`` virtual).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

__all__ = ["deadline_run", "deadline_for", "give_trio_tests_deadlines"]


def deadline_for(timeout: float) -> float:
    """The trio deadline for a pytest-timeout of ``timeout`` seconds: early enough that
    the run can unwind before the SIGALRM (10 %, at least 2 s, before it)."""
    return max(timeout - max(2.0, 0.1 * timeout), 0.5 * timeout)


def _cancel_from_thread(token: trio.lowlevel.TrioToken, scope: trio.CancelScope) -> None:
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(scope.cancel)


def deadline_run(afn: Callable[[], Awaitable[Any]], *, deadline: float,
                 clock: trio.abc.Clock | None = None,
                 instruments: Any = ()) -> None:
    """``trio.run(afn)``, cancelled from a timer thread after ``deadline`` seconds of
    wall-clock time; a cancelled test fails saying so."""

    async def guarded() -> None:
        with trio.CancelScope() as scope:
            timer = threading.Timer(deadline, _cancel_from_thread,
                                    (trio.lowlevel.current_trio_token(), scope))
            timer.daemon = True
            timer.start()
            try:
                await afn()
            finally:
                timer.cancel()
        if scope.cancelled_caught:
            pytest.fail(f"trio test still running after its {deadline:g} s deadline "
                        "(cancelled cleanly before pytest-timeout's alarm)", pytrace=False)

    trio.run(guarded, clock=clock, instruments=instruments)


def give_trio_tests_deadlines(items: list[pytest.Item]) -> None:
    """Make :func:`deadline_run` the trio runner of every ``async def`` test that has a
    pytest-timeout limit (call from ``pytest_collection_modifyitems``)."""
    for item in items:
        timeout = _timeout_of(item)
        if timeout and _is_trio_test(item):
            # pytest-trio takes the first ``run`` a trio mark names: this one, prepended
            item.add_marker(pytest.mark.trio(run=functools.partial(
                deadline_run, deadline=deadline_for(timeout))), append=False)


def _timeout_of(item: pytest.Item) -> float | None:
    """The item's pytest-timeout limit in seconds (its mark, else --timeout, else the ini)."""
    mark = item.get_closest_marker("timeout")
    value = None
    if mark is not None:
        value = mark.args[0] if mark.args else mark.kwargs.get("timeout")
    if value is None:
        value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value) if value else None


def _is_trio_test(item: pytest.Item) -> bool:
    """An ``async def`` test (pytest-trio's trio_mode runs those), hypothesis or not."""
    fn = getattr(item, "obj", None)
    fn = getattr(getattr(fn, "hypothesis", None), "inner_test", fn)
    return inspect.iscoroutinefunction(fn)
