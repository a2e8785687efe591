"""Seed splitting: one seed drives every random choice of a run.

Each component of a world (a link, a node's core, the nemesis, a workload)
draws from its own :class:`random.Random`, seeded from the world's seed and
the component's name through SHA-256. Adding a component or drawing more
numbers in one never shifts the stream of another, and the seeds do not
depend on ``hash()`` (so not on PYTHONHASHSEED) or on creation order.
"""

from __future__ import annotations

import hashlib
import random

__all__ = ["child_seed", "child_rng"]


def child_seed(seed: int, name: str) -> int:
    """A 64-bit seed for component ``name`` of the run seeded with ``seed``."""
    digest = hashlib.sha256(f"dwcp-sim\x00{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def child_rng(seed: int, name: str) -> random.Random:
    return random.Random(child_seed(seed, name))
