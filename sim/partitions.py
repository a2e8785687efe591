"""Partition shapes: each returns the set of *directed* pairs ``(src, dst)`` to block.

The shapes follow Jepsen's nemesis partitioners (jepsen.nemesis: partition-halves,
partition-random-node, bridge, partition-majorities-ring) plus one-way partitions.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["Pairs", "between", "groups", "halves", "isolate", "bridge", "ring", "one_way",
           "cut"]

Pairs = set[tuple[str, str]]


def between(a: Iterable[str], b: Iterable[str]) -> Pairs:
    """Both directions between every node of ``a`` and every node of ``b``."""
    left, right = sorted(set(a)), sorted(set(b))
    pairs = {(x, y) for x in left for y in right if x != y}
    return pairs | {(y, x) for x, y in pairs}


def groups(sides: Sequence[Iterable[str]]) -> Pairs:
    """Any number of sides: nodes talk only within their own side (a node in no side
    talks to everyone)."""
    lists = [sorted(set(side)) for side in sides]
    pairs: Pairs = set()
    for i, left in enumerate(lists):
        for right in lists[i + 1:]:
            pairs |= between(left, right)
    return pairs


def halves(names: Sequence[str], rng: random.Random | None = None) -> Pairs:
    """Two sides, the first ``n // 2`` nodes (shuffled by ``rng`` if given) against the rest."""
    order = list(names)
    if rng is not None:
        rng.shuffle(order)
    k = len(order) // 2
    return between(order[:k], order[k:])


def isolate(name: str, names: Sequence[str]) -> Pairs:
    """One node cut off from every other."""
    return between([name], [n for n in names if n != name])


def bridge(names: Sequence[str], rng: random.Random | None = None) -> Pairs:
    """Two halves that cannot talk to each other, and one node that talks to both."""
    order = list(names)
    if rng is not None:
        rng.shuffle(order)
    if len(order) < 3:
        raise ValueError(f"a bridge partition needs at least 3 nodes, got {len(order)}")
    middle = order[len(order) // 2]
    rest = [n for n in order if n != middle]
    k = len(rest) // 2
    return between(rest[:k], rest[k:])


def ring(names: Sequence[str], rng: random.Random | None = None) -> Pairs:
    """Every node talks only to its two neighbours on a ring (Jepsen's majorities-ring
    for five nodes; for more nodes every view is a minority)."""
    order = list(names)
    if rng is not None:
        rng.shuffle(order)
    n = len(order)
    allowed = {(order[i], order[(i + d) % n]) for i in range(n) for d in (-1, 1)}
    return {(a, b) for a in order for b in order if a != b and (a, b) not in allowed}


def one_way(sources: Iterable[str], targets: Iterable[str]) -> Pairs:
    """Frames from ``sources`` to ``targets`` are lost; the other direction flows."""
    return {(s, t) for s in sorted(set(sources)) for t in sorted(set(targets)) if s != t}


def cut(a: str, b: str, both: bool = True) -> Pairs:
    """One link: ``a -> b`` (and ``b -> a`` if ``both``)."""
    return {(a, b), (b, a)} if both else {(a, b)}
