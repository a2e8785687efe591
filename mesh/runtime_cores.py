"""Hosting one sans-I/O core under trio: its inbox, its timers, its actions.

A :class:`HostedCore` first calls the core's optional ``start(now)`` hook (as the
simulator does), then runs one task that takes events from a bounded inbox,
calls ``core.handle(trio.current_time(), event)`` and executes the returned
actions in order before taking the next event:

* ``Send`` -> ``send(peer, message)`` of the runtime (encode, queue on the peer's
  link; never blocks the core, a drop is counted by the runtime);
* ``SetTimer`` / ``CancelTimer`` -> a per-core timer table; a due timer is
  delivered as ``TimerFired(key)`` through the same loop, so a core sees one
  event at a time;
* ``Persist`` -> ``store.put`` in a worker thread (an fsync never stalls the
  event loop); the core's next event waits for it, which is the guarantee
  ``Persist.sync`` makes;
* ``Notify`` -> a ``notify`` log line.

:class:`Routes` maps wire message tags to the core or callback that consumes them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import attrs
import trio

from mesh.core import (
    Action,
    CancelTimer,
    Core,
    Event,
    Notify,
    Persist,
    Send,
    SetTimer,
    Store,
    TimerFired,
)
from mesh.runtime_log import JsonLog

__all__ = ["HostedCore", "CoreFailed", "Routes", "Handler", "Invocation", "INBOX_EVENTS"]

#: Events waiting for one core. When full, the link readers feeding it wait, so
#: a core that falls behind slows its peers' TCP windows instead of growing
#: memory; 256 is several gossip rounds of a 64-DC federation.
INBOX_EVENTS = 256


Handler = Callable[[str, Any], None]
#: ``fn(core, now) -> actions``: work done in a core's turn on behalf of the node.
Invocation = Callable[[Any, float], Iterable[Action] | None]


@attrs.frozen
class _Invoke:
    fn: Invocation
    label: str
    done: trio.Event


class CoreFailed(Exception):
    """A core raised, or returned something that is not an action: a bug in the core."""


class HostedCore:
    def __init__(
        self,
        name: str,
        core: Core,
        tags: tuple[str, ...],
        *,
        send: Callable[[str, Any], bool],
        store: Store | None,
        log: JsonLog,
        effects: Callable[[object], bool] | None = None,
    ) -> None:
        self.name = name
        #: the host's own actions (e.g. a node's VM work): called in action order,
        #: returns True if it took the action
        self._effects = effects
        self.core = core
        self.tags = tags
        self._send = send
        self._store = store
        self._log = log
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Event | _Invoke](INBOX_EVENTS)
        self._timers: dict[Hashable, int] = {}  # key -> sequence of its live entry
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self.events_handled = 0

    async def deliver(self, event: Event) -> None:
        await self._inbox_send.send(event)

    async def invoke(self, fn: Invocation, label: str) -> None:
        """Run ``fn(core, now)`` in this core's turn (between two events, like the
        simulator's ``World.invoke``), execute the actions it returns, then return."""
        call = _Invoke(fn, label, trio.Event())
        await self._inbox_send.send(call)
        await call.done.wait()

    def next_deadline(self) -> float:
        while self._heap and self._timers.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)  # a cancelled or replaced timer
        return self._heap[0][0] if self._heap else math.inf

    async def run(self) -> None:
        start = getattr(self.core, "start", None)
        if callable(start):  # the optional start hook the simulator calls too
            await self._call(lambda core, now: start(now), "start")
        while True:
            item: Event | _Invoke | None = None
            with trio.move_on_at(self.next_deadline()):
                item = await self._inbox_recv.receive()
            if isinstance(item, _Invoke):
                try:
                    await self._call(item.fn, item.label)
                finally:
                    item.done.set()
                continue
            if item is not None:
                await self._step(item)
                continue
            # Fire due timers one at a time: each may cancel or re-arm others.
            while self.next_deadline() <= trio.current_time():
                _, _, key = heapq.heappop(self._heap)
                del self._timers[key]
                await self._step(TimerFired(key))

    async def _call(self, fn: Invocation, label: str) -> None:
        try:
            actions = fn(self.core, trio.current_time())
        except Exception as exc:
            self._log.event("core_failed", core=self.name, error=repr(exc), on=label)
            raise CoreFailed(f"core {self.name!r} raised in {label}: {exc!r}") from exc
        for action in actions or ():
            await self._execute(action)

    async def _step(self, event: Event) -> None:
        try:
            actions = self.core.handle(trio.current_time(), event)
        except Exception as exc:
            self._log.event("core_failed", core=self.name, error=repr(exc), on=repr(event))
            raise CoreFailed(f"core {self.name!r} raised on {event!r}: {exc!r}") from exc
        self.events_handled += 1
        for action in actions:
            await self._execute(action)

    async def _execute(self, action: object) -> None:
        if isinstance(action, Send):
            self._send(action.peer, action.message)
        elif isinstance(action, SetTimer):
            seq = next(self._seq)
            self._timers[action.key] = seq
            heapq.heappush(self._heap, (action.at, seq, action.key))
        elif isinstance(action, CancelTimer):
            self._timers.pop(action.key, None)
        elif isinstance(action, Persist):
            if self._store is None:
                raise CoreFailed(
                    f"core {self.name!r} persisted {action.key!r} but the node has no store"
                )
            await trio.to_thread.run_sync(self._store.put, action.key, action.value, action.sync)
        elif isinstance(action, Notify):
            self._log.event("notify", core=self.name, kind=action.kind, detail=action.detail)
        elif self._effects is not None and self._effects(action):
            return
        else:
            raise CoreFailed(f"core {self.name!r} returned {action!r}, which is not an action")


class Routes:
    """Message tag -> consumer. A pattern ending in ``.`` is a prefix; the longest wins."""

    def __init__(self) -> None:
        self._routes: dict[str, HostedCore | Handler] = {}

    def add(self, tags: tuple[str, ...], target: HostedCore | Handler) -> None:
        for tag in tags:
            if tag in self._routes:
                raise ValueError(f"message tag {tag!r} already has a consumer")
        for tag in tags:
            self._routes[tag] = target

    def lookup(self, tag: str) -> HostedCore | Handler | None:
        target = self._routes.get(tag)
        if target is not None:
            return target
        best = ""
        for pattern in self._routes:
            if pattern.endswith(".") and tag.startswith(pattern) and len(pattern) > len(best):
                best = pattern
        return self._routes.get(best) if best else None
