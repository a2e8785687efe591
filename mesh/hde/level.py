"""Which zstd level to compress chunks with, from the link mode and measured speeds.

The mode bounds the candidate levels (DESIGN.md: the mode picks the zstd
level); within them the level is chosen from measurements on the image being
sent. A transfer moves logical bytes at ``min(cores * C, B / r)``: ``C`` the
compression speed per core (logical bytes/s), ``r`` the compressed fraction,
``B`` the link's bandwidth. The chosen level maximises that rate, so a level
is never chosen that compresses slower than the link drains when a cheaper
one would deliver more; among levels that deliver the same rate (all bound by
the link), the one with the smaller output wins.

Level 0 means store (no compression): on a 10 Gbit/s datacenter link with
data that compresses poorly it is the fastest choice. Whatever the mode, storing is
the floor (issue 17 item 6): :func:`measure_levels` always measures it first, and
:func:`choose_level` never returns a level whose rate is below what sending the
pages uncompressed would move over the same link — level 0's measured rate, or the
link's bandwidth when store was not measured (a copy outruns any link here: ~10 GB/s
per core against 10 Gbit/s). A mode's first level is its cheapest *compressing* one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from mesh.hde.codec import compress

__all__ = ["MODE_LEVELS", "LevelSample", "choose_level", "measure_levels", "uncompressed_rate"]

#: Candidate levels per link mode, cheapest first. Speeds measured here on 1 MiB chunks of
#: Python source (one core): store ~10 GB/s, -5 ~500 MB/s, 1 ~445 MB/s, 3 ~330 MB/s,
#: 9 ~77 MB/s, 12 ~49 MB/s, 19 ~5 MB/s (zstd's README gives the same ordering). A datacenter
#: link (>= 1 Gbit/s) outruns level 3 on two cores, an internet link (< 100 Mbit/s) is
#: outrun by level 12 only on incompressible data: the bounds follow. Levels 13-16 are
#: HDE's own ladder of optimal-parser settings (mesh.hde.compressors: 12-44 MB/s per core
#: on guest memory), the steps at which a 100 Mbit/s link and two cores meet.
MODE_LEVELS: dict[str, tuple[int, ...]] = {
    "datacenter": (0, -5, -1, 1, 3),
    "hybrid": (0, -1, 1, 3, 6, 9),
    "internet": (1, 3, 6, 9, 12, 13, 14, 15, 16, 19),
}


@attrs.frozen
class LevelSample:
    level: int
    bytes_per_s_per_core: float
    ratio: float

    def rate(self, link_bytes_per_s: float, cores: int) -> float:
        """Logical bytes per second a transfer moves at this level."""
        return min(cores * self.bytes_per_s_per_core, link_bytes_per_s / max(self.ratio, 1e-9))


def uncompressed_rate(samples: Sequence[LevelSample], link_bytes_per_s: float,
                      cores: int) -> float:
    """Logical bytes per second that sending the pages as they are would move: level 0's
    measured rate, else the link's bandwidth (storing is a copy, faster than any link)."""
    stored = [s for s in samples if s.level == 0]
    if stored:
        return stored[0].rate(link_bytes_per_s, cores)
    return link_bytes_per_s


def choose_level(samples: Sequence[LevelSample], link_bytes_per_s: float, cores: int) -> int:
    """The level that moves logical bytes fastest; ties go to the smaller output, then to
    the cheaper level (measured earlier). Never a level slower than sending uncompressed:
    if no measured level reaches that rate, 0 (store)."""
    if not samples:
        raise ValueError("choose_level needs at least one measured level")
    if link_bytes_per_s <= 0 or cores <= 0:
        raise ValueError("link bandwidth and cores must be positive")
    floor = uncompressed_rate(samples, link_bytes_per_s, cores)
    order = {id(s): i for i, s in enumerate(samples)}
    best = max(samples, key=lambda s: (s.rate(link_bytes_per_s, cores), -s.ratio,
                                       -order[id(s)]))
    if best.rate(link_bytes_per_s, cores) < floor:
        return 0
    return best.level


def measure_levels(
    sample: Sequence[bytes],
    mode: str,
    link_bytes_per_s: float,
    cores: int,
    clock: Callable[[], float],
) -> list[LevelSample]:
    """Store ``sample`` (chunks of the pages to send) as level 0, the uncompressed floor,
    then compress it at the mode's levels, cheapest first, timing each with ``clock``.
    Stops after the first compressing level at which the CPU, not the link, bounds the
    rate: every later level is slower still."""
    if mode not in MODE_LEVELS:
        raise ValueError(f"unknown link mode {mode!r}; expected one of {sorted(MODE_LEVELS)}")
    total = sum(len(c) for c in sample)
    if total == 0:
        raise ValueError("measure_levels needs a non-empty sample")
    out: list[LevelSample] = []
    for level in (0, *(lv for lv in MODE_LEVELS[mode] if lv != 0)):
        t0 = clock()
        if level == 0:
            size = sum(len(bytes(c)) for c in sample)
        else:
            size = sum(min(len(compress(c, level)), len(c)) for c in sample)
        elapsed = max(clock() - t0, 1e-9)
        s = LevelSample(level, total / elapsed, size / total)
        out.append(s)
        if level != 0 and cores * s.bytes_per_s_per_core < link_bytes_per_s / max(s.ratio, 1e-9):
            break
    return out
