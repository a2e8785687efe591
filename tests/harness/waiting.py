"""Waiting for a condition, never for a fixed time.

A test that needs something to have happened (a link up, an outcome in the ledger, a
writer's pages on disk) waits until it holds and fails, naming what it waited for, when
it does not hold within a bound. The bound is a ceiling for a loaded machine, not the
expected time: a condition that holds at once costs nothing. The node's tasks (or a
thread, or another process) change the state these look at; looking again every
:data:`LOOK_EVERY` seconds keeps the reaction prompt without spinning a core the node
needs on a 2-core machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import trio

T = TypeVar("T")

#: Seconds between two looks at a condition: 20 ms is below any step these tests
#: time (a round, a ping period of 0.5 s) and costs nothing measurable.
LOOK_EVERY = 0.02


async def wait_until(holds: Callable[[], T], what: str, timeout: float = 10) -> T:
    """In a trio task: wait until ``holds()`` is true and return what it returned."""
    with trio.move_on_after(timeout):
        while not (got := holds()):
            await trio.sleep(LOOK_EVERY)
        return got
    raise AssertionError(f"not within {timeout} s: {what}")


def poll_until(holds: Callable[[], T], what: str, timeout: float = 10,
               every: float = LOOK_EVERY) -> T:
    """Outside trio (a thread or a process does the work): the same as
    :func:`wait_until`, looking every ``every`` seconds."""
    deadline = time.monotonic() + timeout
    while not (got := holds()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)
    return got
