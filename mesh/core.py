"""The vocabulary every sans-I/O protocol core speaks.

A core is a plain object with ``handle(now, event) -> list[Action]``. ``now``
is seconds on the driver's clock (the real monotonic clock in a node, the
virtual clock in the simulator). Events tell the core what happened; actions
tell the driver what to do. A core never sleeps, reads a clock, touches a
socket or a file, or draws from the global ``random``: randomness is an
injected ``random.Random`` and durability goes through :class:`Persist`
actions (or an injected store object with the :class:`Store` interface).

Both drivers (``mesh.runtime.node_runtime`` over trio, ``sim`` over the virtual world)
execute the same actions, so whatever a core does in the simulator it does in
a real node.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

import attrs

__all__ = [
    "Received",
    "TimerFired",
    "PeerUp",
    "PeerDown",
    "Offloaded",
    "Send",
    "SetTimer",
    "CancelTimer",
    "Persist",
    "Notify",
    "Offload",
    "Event",
    "Action",
    "Core",
    "Store",
]

# --------------------------------------------------------------------------- events


@attrs.frozen
class Received:
    """A decoded message arrived from ``peer``; ``raw`` is the frame as received."""

    peer: str
    message: Any
    raw: bytes = b""


@attrs.frozen
class TimerFired:
    key: Hashable


@attrs.frozen
class PeerUp:
    """An authenticated control connection to ``peer`` is open."""

    peer: str


@attrs.frozen
class PeerDown:
    peer: str


@attrs.frozen
class Offloaded:
    """The outcome of an :class:`Offload` with ``key``: ``result`` is what its work
    returned, or ``error`` the exception it raised (then ``result`` is None)."""

    key: Hashable
    result: Any = None
    error: Exception | None = None


Event = Received | TimerFired | PeerUp | PeerDown | Offloaded

# --------------------------------------------------------------------------- actions


@attrs.frozen
class Send:
    """Send ``message`` (a registered wire message) to ``peer``."""

    peer: str
    message: Any


@attrs.frozen
class SetTimer:
    """Fire :class:`TimerFired` with ``key`` at time ``at``; replaces a timer with that key."""

    key: Hashable
    at: float


@attrs.frozen
class CancelTimer:
    key: Hashable


@attrs.frozen
class Persist:
    """Write ``value`` under ``key`` to the durable store; ``sync`` makes it survive a crash
    before anything the core sends after it leaves the node. The runtime may hand the core
    more events first (group commit: one transaction for the events waiting together), but
    no Send of those events goes out before the write is durable; the simulator writes it
    at once."""

    key: str
    value: bytes
    sync: bool = True


@attrs.frozen
class Notify:
    """Something for the node's operators or upper layers (a log line, a metric, an event)."""

    kind: str
    detail: Any = None


@attrs.frozen(eq=False)
class Offload:
    """Run ``work()`` away from the driver's event handling, then hand the core
    :class:`Offloaded` with ``key`` (its result, or the exception it raised). For work
    that takes long and touches nothing the core or the driver holds (a pure function of
    what it was given, e.g. rebuilding a large state from bytes): the node runs it in a
    worker thread, so its event loop keeps answering peers meanwhile; the core goes on
    handling events until the outcome arrives, and must expect any of them first."""

    key: Hashable
    work: Callable[[], Any]


Action = Send | SetTimer | CancelTimer | Persist | Notify | Offload


class Core(Protocol):
    def handle(self, now: float, event: Event) -> list[Action]: ...


class Store(Protocol):
    """Durable key/value storage a core may read at start-up."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes, sync: bool = True) -> None: ...

    def keys(self, prefix: str = "") -> list[str]: ...
