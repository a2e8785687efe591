"""Simulated links: one :class:`Link` per directed pair of nodes.

A frame sent from ``a`` to ``b`` at time ``t``:

1. is refused if the pair ``(a, b)`` is blocked (a partition or a cut);
2. waits until the link is no longer clogged (a clog holds frames, it does not drop them);
3. queues behind earlier frames for the link's transmitter and is serialized at
   ``bandwidth`` bits/s (a drop-tail queue of ``queue_bytes`` bounds the backlog);
4. is lost with probability ``loss`` (after it took its turn on the transmitter);
5. propagates for a latency drawn from the link's distribution;
6. arrives no earlier than the previous frame on the link (links are FIFO, as a TCP
   stream is) unless the frame is chosen for reordering (probability ``reorder``), which
   adds an extra delay of up to twice the mean latency and lets it overtake or be overtaken;
7. is duplicated with probability ``duplicate`` (the copy takes its own latency).

A partition also drops frames already in flight when they arrive (see ``World``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import attrs

__all__ = [
    "Latency",
    "Constant",
    "Uniform",
    "Normal",
    "LogNormal",
    "LinkSpec",
    "Link",
    "DATACENTER_LINK",
]


class Latency:
    """A one-way latency distribution in seconds."""

    mean: float

    def sample(self, rng: random.Random) -> float:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} does not define sample()")


@attrs.frozen
class Constant(Latency):
    seconds: float = attrs.field(validator=attrs.validators.ge(0.0))

    @property
    def mean(self) -> float:  # type: ignore[override]
        return self.seconds

    def sample(self, rng: random.Random) -> float:
        return self.seconds


@attrs.frozen
class Uniform(Latency):
    low: float = attrs.field(validator=attrs.validators.ge(0.0))
    high: float

    def __attrs_post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"Uniform latency: high {self.high} < low {self.low}")

    @property
    def mean(self) -> float:  # type: ignore[override]
        return (self.low + self.high) / 2

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)


@attrs.frozen
class Normal(Latency):
    """``mean`` with Gaussian jitter of standard deviation ``jitter``, never below ``floor``
    (a sample under the floor is clamped to it: light cannot go faster)."""

    mean: float = attrs.field(validator=attrs.validators.ge(0.0))  # type: ignore[misc]
    jitter: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    floor: float = 0.0

    def sample(self, rng: random.Random) -> float:
        value = rng.gauss(self.mean, self.jitter)
        return value if value > self.floor else self.floor


@attrs.frozen
class LogNormal(Latency):
    """A heavy right tail, as measured WAN delays have: ``base`` plus a log-normal
    part with the given ``median`` and shape ``sigma``."""

    median: float = attrs.field(validator=attrs.validators.gt(0.0))
    sigma: float = attrs.field(default=0.5, validator=attrs.validators.ge(0.0))
    base: float = 0.0

    @property
    def mean(self) -> float:  # type: ignore[override]
        return self.base + self.median * math.exp(self.sigma**2 / 2)

    def sample(self, rng: random.Random) -> float:
        return self.base + rng.lognormvariate(math.log(self.median), self.sigma)


def _probability(_inst: object, attr: attrs.Attribute, value: float) -> None:  # type: ignore[type-arg]
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"link {attr.name} must be a probability in [0, 1], got {value}")


@attrs.frozen
class LinkSpec:
    """How one direction of a link behaves. ``bandwidth`` is bits/s (None: unlimited)."""

    latency: Latency = Constant(0.0005)
    bandwidth: float | None = None
    loss: float = attrs.field(default=0.0, validator=_probability)
    duplicate: float = attrs.field(default=0.0, validator=_probability)
    reorder: float = attrs.field(default=0.0, validator=_probability)
    queue_bytes: int | None = None

    def evolve(self, **changes: Any) -> LinkSpec:
        return attrs.evolve(self, **changes)


#: Inside one datacenter: ~0.25 ms one way (0.5 ms RTT, the intra-zone figure
#: of the Azure latency statistics page cited in sim/geo.py), 10 Gbit/s.
DATACENTER_LINK = LinkSpec(latency=Normal(0.00025, 0.00005, 0.0001), bandwidth=10e9)


class Link:
    """The state of one directed link: its transmitter queue and its last arrival."""

    __slots__ = (
        "src", "dst", "spec", "rng", "busy_until", "last_arrival", "clogged_until",
        "sent", "lost", "duplicated", "reordered", "queue_drops", "bytes",
    )

    def __init__(self, src: str, dst: str, spec: LinkSpec, rng: random.Random) -> None:
        self.src = src
        self.dst = dst
        self.spec = spec
        self.rng = rng
        self.busy_until = 0.0
        self.last_arrival = 0.0
        self.clogged_until = 0.0
        self.sent = 0
        self.lost = 0
        self.duplicated = 0
        self.reordered = 0
        self.queue_drops = 0
        self.bytes = 0

    def transmit(self, now: float, size: int) -> tuple[float, ...]:
        """Arrival times of a frame of ``size`` bytes handed to the link at ``now``
        (empty if it is lost, two if it is duplicated)."""
        spec = self.spec
        rng = self.rng
        self.sent += 1
        start = now if now > self.clogged_until else self.clogged_until
        if spec.bandwidth:
            begin = start if start > self.busy_until else self.busy_until
            backlog = (begin - start) * spec.bandwidth / 8
            if spec.queue_bytes is not None and backlog > spec.queue_bytes:
                self.queue_drops += 1
                return ()
            start = begin + size * 8 / spec.bandwidth
            self.busy_until = start
        self.bytes += size
        if spec.loss and rng.random() < spec.loss:
            self.lost += 1  # lost on the way: it still took its turn on the transmitter
            return ()
        first = self._arrival(start)
        if spec.duplicate and rng.random() < spec.duplicate:
            self.duplicated += 1
            return (first, self._arrival(start))
        return (first,)

    def _arrival(self, departed: float) -> float:
        spec = self.spec
        arrival = departed + spec.latency.sample(self.rng)
        if spec.reorder and self.rng.random() < spec.reorder:
            self.reordered += 1
            return arrival + self.rng.uniform(0.0, 2.0 * spec.latency.mean)
        if arrival < self.last_arrival:
            arrival = self.last_arrival
        self.last_arrival = arrival
        return arrival
