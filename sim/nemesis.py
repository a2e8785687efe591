"""Faults: the nemesis schedules them on a world, and heals them all at the quiet phase.

Every method takes the virtual time the fault starts (``at``) and, where it makes sense,
when it ends (``until``; None: until :meth:`Nemesis.heal_all`). Faults:

* ``partition(pairs)``: block directed pairs (see :mod:`sim.partitions` for shapes:
  halves, isolate, bridge, ring, one-way, cut);
* ``clog(a, b)``: hold every frame on the link(s) until the clog ends (nothing is lost);
* ``degrade(a, b, spec)``: swap the links' :class:`LinkSpec` (more loss, latency, less
  bandwidth) and restore it afterwards;
* ``crash(name, restart_at)``: crash a node (unsynced writes are lost) and restart it;
* ``clock(name, offset)``: shift a node's clock by ``offset`` seconds;
* ``byzantine(name, Byzantine(...))``: rewrite the node's outgoing frames.

:meth:`Nemesis.swarm` draws a random mix of these from the run's seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mesh import wire
from sim import partitions
from sim.network import LinkSpec, Normal
from sim.world import SimNode, World

__all__ = ["Nemesis", "Byzantine", "SWARM_KINDS", "BENIGN_KINDS"]

#: Every fault kind the swarm knows; BENIGN_KINDS leaves out Byzantine behaviour.
SWARM_KINDS = ("partition", "one_way", "cut", "clog", "degrade", "crash", "clock", "byzantine")
BENIGN_KINDS = tuple(k for k in SWARM_KINDS if k != "byzantine")
#: The largest clock jump of the swarm's ``clock`` fault, either way (seconds); PBFT's
#: batch-time bound (consensus.pbft.batch_time.TIME_BOUND) covers two such clocks.
CLOCK_JUMP_MAX = 30.0

#: Frames kept per destination for replay attacks.
REPLAY_HISTORY = 32


class Byzantine:
    """A tamper hook for :attr:`SimNode.tamper`: each outgoing frame is, by the given
    probabilities, dropped, delayed, duplicated, replaced by an old frame (replay),
    corrupted (bytes flipped), or rewritten per destination by ``equivocate(dst, msg)``
    (which returns the message that peer should get instead, or None to keep it).
    ``silent`` drops everything."""

    def __init__(self, rng: random.Random, *, drop: float = 0.0, delay: float = 0.0,
                 max_delay: float = 5.0, duplicate: float = 0.0, replay: float = 0.0,
                 corrupt: float = 0.0, silent: bool = False,
                 equivocate: Callable[[str, Any], Any] | None = None) -> None:
        self.rng = rng
        self.drop = drop
        self.delay = delay
        self.max_delay = max_delay
        self.duplicate = duplicate
        self.replay = replay
        self.corrupt = corrupt
        self.silent = silent
        self.equivocate = equivocate
        self.history: dict[str, list[bytes]] = {}
        self.counts = {"dropped": 0, "delayed": 0, "duplicated": 0, "replayed": 0,
                       "corrupted": 0, "equivocated": 0}

    def __call__(self, world: World, node: SimNode, dst: str, msg: Any,
                 raw: bytes) -> list[tuple[str, bytes, float]]:
        rng = self.rng
        counts = self.counts
        if self.silent or (self.drop and rng.random() < self.drop):
            counts["dropped"] += 1
            return []
        if self.equivocate is not None:
            other = self.equivocate(dst, msg)
            if other is not None:
                counts["equivocated"] += 1
                raw = wire.encode(other)
        past = self.history.setdefault(dst, [])
        past.append(raw)
        if len(past) > REPLAY_HISTORY:
            del past[0]
        if self.replay and rng.random() < self.replay:
            counts["replayed"] += 1
            raw = past[rng.randrange(len(past))]
        if self.corrupt and rng.random() < self.corrupt:
            counts["corrupted"] += 1
            data = bytearray(raw)
            for _ in range(1 + rng.randrange(3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            raw = bytes(data)
        wait = 0.0
        if self.delay and rng.random() < self.delay:
            counts["delayed"] += 1
            wait = rng.uniform(0.0, self.max_delay)
        out = [(dst, raw, wait)]
        if self.duplicate and rng.random() < self.duplicate:
            counts["duplicated"] += 1
            out.append((dst, raw, wait + rng.uniform(0.0, self.max_delay)))
        return out


class Nemesis:
    def __init__(self, world: World) -> None:
        self.world = world
        self.rng = world.rng("nemesis")
        self.log: list[tuple[float, str]] = []
        self._tokens: set[int] = set()
        self._clogs: dict[tuple[str, str], float] = {}
        self._saved_specs: dict[tuple[str, str], LinkSpec] = {}
        self._crashed: set[str] = set()
        self._offsets: set[str] = set()
        self._byzantine: set[str] = set()

    def _note(self, what: str) -> None:
        self.log.append((self.world.now, what))

    # ------------------------------------------------------------------ faults

    def partition(self, pairs: Iterable[tuple[str, str]], at: float,
                  until: float | None = None, label: str = "partition") -> None:
        group = sorted(set(pairs))
        token: list[int] = []

        def start(world: World) -> None:
            token.append(world.block(group))
            self._tokens.add(token[0])
            self._note(f"{label}: {len(group)} directed pairs blocked")

        def end(world: World) -> None:
            if token and token[0] in self._tokens:
                self._tokens.discard(token[0])
                world.unblock(token[0])
                self._note(f"{label} healed")

        self.world.at(at, start, label)
        if until is not None:
            self.world.at(until, end, f"{label} heal")

    def clog(self, a: str, b: str, at: float, until: float, both: bool = True) -> None:
        pairs = [(a, b), (b, a)] if both else [(a, b)]

        def start(world: World) -> None:
            for pair in pairs:
                link = world.link(*pair)
                link.clogged_until = max(link.clogged_until, until)
                self._clogs[pair] = link.clogged_until
            self._note(f"clog {a}-{b} until {until:.3f}")

        self.world.at(at, start, f"clog {a} {b}")

    def degrade(self, a: str, b: str, spec: LinkSpec, at: float, until: float | None = None,
                both: bool = True) -> None:
        pairs = [(a, b), (b, a)] if both else [(a, b)]

        def start(world: World) -> None:
            for pair in pairs:
                link = world.link(*pair)
                self._saved_specs.setdefault(pair, link.spec)
                link.spec = spec
            self._note(f"degrade {a}-{b}")

        def end(world: World) -> None:
            for pair in pairs:
                saved = self._saved_specs.pop(pair, None)
                if saved is not None:
                    world.link(*pair).spec = saved

        self.world.at(at, start, f"degrade {a} {b}")
        if until is not None:
            self.world.at(until, end, f"restore {a} {b}")

    def crash(self, name: str, at: float, restart_at: float | None = None) -> None:
        def down(world: World) -> None:
            if world.nodes[name].up:
                lost = world.crash(name)
                self._crashed.add(name)
                self._note(f"crash {name} (lost {len(lost)} unsynced writes)")

        def up(world: World) -> None:
            if name in self._crashed:
                self._crashed.discard(name)
                world.restart(name)
                self._note(f"restart {name}")

        self.world.at(at, down, f"crash {name}")
        if restart_at is not None:
            self.world.at(restart_at, up, f"restart {name}")

    def clock(self, name: str, offset: float, at: float, until: float | None = None) -> None:
        def shift(world: World) -> None:
            world.nodes[name].clock_offset = offset
            self._offsets.add(name)
            self._note(f"clock {name} {offset:+.3f} s")

        def reset(world: World) -> None:
            world.nodes[name].clock_offset = 0.0
            self._offsets.discard(name)

        self.world.at(at, shift, f"clock {name}")
        if until is not None:
            self.world.at(until, reset, f"clock reset {name}")

    def byzantine(self, name: str, behaviour: Byzantine, at: float,
                  until: float | None = None) -> None:
        def turn(world: World) -> None:
            world.nodes[name].tamper = behaviour
            self._byzantine.add(name)
            self._note(f"byzantine {name}")

        def honest(world: World) -> None:
            world.nodes[name].tamper = None
            self._byzantine.discard(name)

        self.world.at(at, turn, f"byzantine {name}")
        if until is not None:
            self.world.at(until, honest, f"honest {name}")

    # ------------------------------------------------------------------ quiet phase

    def heal_all(self) -> None:
        """End every fault now: the quiet phase starts from a healthy network."""
        world = self.world
        for token in sorted(self._tokens):
            world.unblock(token)
        self._tokens.clear()
        for pair in sorted(self._clogs):
            world.link(*pair).clogged_until = world.now
        self._clogs.clear()
        for pair, spec in sorted(self._saved_specs.items()):
            world.link(*pair).spec = spec
        self._saved_specs.clear()
        for name in sorted(self._offsets):
            world.nodes[name].clock_offset = 0.0
        self._offsets.clear()
        for name in sorted(self._byzantine):
            world.nodes[name].tamper = None
        self._byzantine.clear()
        for name in sorted(self._crashed):
            world.restart(name)
        self._crashed.clear()
        self._note("heal all")

    # ------------------------------------------------------------------ swarm

    def swarm(self, names: Sequence[str], until: float, kinds: Sequence[str] = BENIGN_KINDS,
              count: int | None = None, start: float = 1.0) -> list[str]:
        """Schedule a random mix of ``count`` faults of ``kinds`` between ``start`` and
        ``until``, drawn from the nemesis' seed. Returns their descriptions."""
        rng = self.world.rng("swarm")
        unknown = sorted(set(kinds) - set(SWARM_KINDS))
        if unknown:
            raise ValueError(f"unknown swarm fault kinds {unknown}; known: {list(SWARM_KINDS)}")
        names = list(names)
        if count is None:
            count = rng.randint(2, 4 + len(names) // 2)
        drawn: list[str] = []
        window = max(until - start, 0.0)
        for _ in range(count if kinds else 0):
            kind = rng.choice(list(kinds))
            at = start + rng.uniform(0.0, 0.8 * window)
            end = min(until, at + rng.uniform(0.05, 0.4) * window)
            drawn.append(self._draw(kind, rng, names, at, end))
        return drawn

    def _draw(self, kind: str, rng: random.Random, names: list[str], at: float,
              end: float) -> str:
        a, b = rng.sample(names, 2) if len(names) > 1 else (names[0], names[0])
        if kind == "partition":
            shape = rng.choice(["halves", "isolate", "bridge", "ring"])
            if shape == "isolate" or len(names) < 3:
                pairs = partitions.isolate(a, names)
            elif shape == "bridge":
                pairs = partitions.bridge(names, rng)
            elif shape == "ring" and len(names) >= 4:
                pairs = partitions.ring(names, rng)
            else:
                pairs = partitions.halves(names, rng)
            self.partition(pairs, at, end, f"partition {shape}")
            return f"partition {shape} {at:.2f}-{end:.2f}"
        if kind == "one_way":
            k = rng.randint(1, max(1, len(names) // 2))
            sources = rng.sample(names, k)
            self.partition(partitions.one_way(sources, names), at, end, "one-way")
            return f"one-way from {sources} {at:.2f}-{end:.2f}"
        if kind == "cut":
            self.partition(partitions.cut(a, b, both=rng.random() < 0.5), at, end, "cut")
            return f"cut {a}-{b} {at:.2f}-{end:.2f}"
        if kind == "clog":
            self.clog(a, b, at, end)
            return f"clog {a}-{b} {at:.2f}-{end:.2f}"
        if kind == "degrade":
            spec = self.world.link(a, b).spec.evolve(
                loss=rng.uniform(0.01, 0.3), duplicate=rng.uniform(0.0, 0.1),
                reorder=rng.uniform(0.0, 0.2),
                latency=Normal(rng.uniform(0.01, 0.3), rng.uniform(0.0, 0.05)))
            self.degrade(a, b, spec, at, end)
            return f"degrade {a}-{b} {at:.2f}-{end:.2f}"
        if kind == "crash":
            self.crash(a, at, end)
            return f"crash {a} {at:.2f}-{end:.2f}"
        if kind == "clock":
            offset = rng.uniform(-CLOCK_JUMP_MAX, CLOCK_JUMP_MAX)
            self.clock(a, offset, at, end)
            return f"clock {a} {offset:+.2f} {at:.2f}-{end:.2f}"
        behaviour = Byzantine(self.world.rng(f"byzantine/{a}/{at!r}"),
                              drop=rng.uniform(0, 0.3), delay=rng.uniform(0, 0.3),
                              duplicate=rng.uniform(0, 0.3), replay=rng.uniform(0, 0.3),
                              corrupt=rng.uniform(0, 0.3))
        self.byzantine(a, behaviour, at, end)
        return f"byzantine {a} {at:.2f}-{end:.2f}"
