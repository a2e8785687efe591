"""What the world hosts: a simulated node, its mounted cores, and the records a run keeps.

See :mod:`sim.world` for the host API; these names are re-exported there.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable
from typing import Any, NamedTuple, Protocol

from sim.store import SimStore

#: Marks a class not yet looked up in the route cache (None is a cached "no core").
_UNROUTED: Any = object()

__all__ = ["SimNode", "HostedCore", "NotifyRecord", "Violation", "SimError", "Tamper",
           "Clock"]


class Clock(Protocol):
    """What a node reads of its world (sim.world.World): virtual time and named random
    streams. A protocol, so this module does not import the world that imports it."""

    now: float

    def rng(self, name: str) -> random.Random: ...


#: A Byzantine hook: (world, node, dst, message, raw) -> [(dst, raw, extra_delay), ...];
#: the world is a sim.world.World (typed Any here for the reason Clock gives).
Tamper = Callable[[Any, "SimNode", str, Any, bytes], Iterable[tuple[str, bytes, float]]]


class SimError(Exception):
    """A core misbehaved under the simulator (raised, returned a non-action, ...)."""


class NotifyRecord(NamedTuple):
    time: float
    node: str
    core: str
    kind: str
    detail: Any


class Violation(NamedTuple):
    time: float
    checker: str
    message: str
    event: str

    def as_json(self) -> dict[str, Any]:
        return {"time": self.time, "checker": self.checker, "message": self.message,
                "event": self.event}


class HostedCore:
    """One core mounted on a node, with its timers."""

    __slots__ = ("name", "core", "node", "timers")

    def __init__(self, name: str, core: Any, node: SimNode) -> None:
        self.name = name
        self.core = core
        self.node = node
        self.timers: dict[Hashable, int] = {}


class SimNode:
    """A simulated datacenter node: cores, a store, a clock offset, an up/down state."""

    def __init__(self, world: Clock, name: str, build: Callable[[SimNode], None]) -> None:
        self.world = world
        self.name = name
        self.build = build
        self.store = SimStore()
        self.up = False
        self.incarnation = 0
        self.clock_offset = 0.0
        #: Byzantine hook (see sim.nemesis.Byzantine); None: honest.
        self.tamper: Tamper | None = None
        self.cores: dict[str, HostedCore] = {}
        self._exact: dict[type, HostedCore] = {}
        self._prefixes: list[tuple[str, HostedCore]] = []
        self._route_cache: dict[type, HostedCore | None] = {}

    def __repr__(self) -> str:
        return f"SimNode({self.name!r}, up={self.up}, incarnation={self.incarnation})"

    def rng(self, name: str) -> random.Random:
        return self.world.rng(f"node/{self.name}/{self.incarnation}/{name}")

    def now(self) -> float:
        """The node's local clock."""
        return self.world.now + self.clock_offset

    def mount(self, name: str, core: Any, accepts: Iterable[type | str] = ()) -> HostedCore:
        if name in self.cores:
            raise SimError(f"node {self.name}: a core named {name!r} is already mounted")
        if not callable(getattr(core, "handle", None)):
            raise SimError(f"node {self.name}: core {name!r} has no handle(now, event) method")
        hosted = HostedCore(name, core, self)
        self.cores[name] = hosted
        for item in accepts:
            if isinstance(item, str):
                self._prefixes.append((item, hosted))
            else:
                self._exact[item] = hosted
        self._route_cache.clear()
        return hosted

    def core(self, name: str) -> Any:
        return self.cores[name].core

    def route(self, cls: type) -> HostedCore | None:
        cached = self._route_cache.get(cls, _UNROUTED)
        if cached is not _UNROUTED:
            return cached
        hosted = self._exact.get(cls)
        if hosted is None:
            tag = getattr(cls, "wire_tag", "")
            for prefix, candidate in self._prefixes:
                if tag.startswith(prefix):
                    hosted = candidate
                    break
        self._route_cache[cls] = hosted
        return hosted

    def _unmount_all(self) -> None:
        self.cores.clear()
        self._exact.clear()
        self._prefixes.clear()
        self._route_cache.clear()
