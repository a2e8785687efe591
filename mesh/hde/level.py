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

A level's rate counts all the CPU its transfer costs, not compression alone: every level
also pays for work that does not depend on it — indexing the image (a SHA-256 of every
block, a fingerprint of every page), planning, framing and digesting chunks, and in the
node sealing them — on the same cores. ``fixed_s_per_byte`` (CPU seconds per byte sent)
adds that work to every level's cost, storing's included: a level then moves
``min(cores / (1 / C + fixed), B / r)``. Without it a cheap level looks twice as fast
next to storing as it is: on the fuller guest (bench hde, 2026-12-07) zstd -5 compressed
at ~700 MB/s per core, so ``2 x 700`` beat a 10 Gbit/s link's 1,250 MB/s and -5 was
chosen, while the whole encode job — the index costs about as much CPU as -5 itself —
moved 768-816 MB/s at -5 (two quiet runs) where it had moved 1,096-1,511 MB/s storing
(two earlier quiet runs): the picker chose a level slower than sending uncompressed
(issue 17 item 6). Speeds are measured as the least time of
``passes`` runs over the sample: one timing of 8 MiB swung the same choice between store
and -5 from run to run.

The node does not go by the mode label (issue 17, task nodecold): it measures the whole
ladder :data:`LEVELS` on the pages it will send against the link rate measured for that
peer (:func:`measure_ladder`), and while the chunks go a :class:`LevelGovernor` moves the
level chunk by chunk so that the link stays full: the highest level the encoders can
feed the link at, never one that lets the link run dry while a cheaper one would not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import attrs

from mesh.hde.codec import compress

__all__ = ["MODE_LEVELS", "LEVELS", "LevelSample", "LevelGovernor", "choose_level",
           "measure_levels", "measure_ladder", "uncompressed_rate"]

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


#: Every level the node chooses among, cheaper first, whatever the link's mode: store,
#: zstd's fast levels, its default ladder and HDE's optimal-parser steps (speeds above).
LEVELS: tuple[int, ...] = (0, -5, -1, 1, 3, 6, 9, 12, 13, 14, 15, 16, 19)


@attrs.frozen
class LevelSample:
    level: int
    bytes_per_s_per_core: float
    ratio: float

    def rate(self, link_bytes_per_s: float, cores: int, fixed_s_per_byte: float = 0.0) -> float:
        """Logical bytes per second a transfer moves at this level, when every byte also
        costs ``fixed_s_per_byte`` of CPU on the same cores for work any level does."""
        cpu = cores / (1.0 / self.bytes_per_s_per_core + fixed_s_per_byte)
        return min(cpu, link_bytes_per_s / max(self.ratio, 1e-9))


def uncompressed_rate(samples: Sequence[LevelSample], link_bytes_per_s: float,
                      cores: int, fixed_s_per_byte: float = 0.0) -> float:
    """Logical bytes per second that sending the pages as they are would move: level 0's
    measured rate, else the link's bandwidth bounded by the fixed work (storing is a
    copy, faster than any link)."""
    stored = [s for s in samples if s.level == 0]
    if stored:
        return stored[0].rate(link_bytes_per_s, cores, fixed_s_per_byte)
    if fixed_s_per_byte > 0:
        return min(link_bytes_per_s, cores / fixed_s_per_byte)
    return link_bytes_per_s


def choose_level(samples: Sequence[LevelSample], link_bytes_per_s: float, cores: int,
                 fixed_s_per_byte: float = 0.0) -> int:
    """The level that moves logical bytes fastest; ties go to the smaller output, then to
    the cheaper level (measured earlier). Never a level slower than sending uncompressed:
    if no measured level reaches that rate, 0 (store). ``fixed_s_per_byte``: CPU seconds
    per byte sent of the work every level does besides compressing (module doc)."""
    if not samples:
        raise ValueError("choose_level needs at least one measured level")
    if link_bytes_per_s <= 0 or cores <= 0:
        raise ValueError("link bandwidth and cores must be positive")
    if fixed_s_per_byte < 0:
        raise ValueError(f"fixed_s_per_byte must be >= 0, not {fixed_s_per_byte}")
    floor = uncompressed_rate(samples, link_bytes_per_s, cores, fixed_s_per_byte)
    order = {id(s): i for i, s in enumerate(samples)}
    best = max(samples, key=lambda s: (s.rate(link_bytes_per_s, cores, fixed_s_per_byte),
                                       -s.ratio, -order[id(s)]))
    if best.rate(link_bytes_per_s, cores, fixed_s_per_byte) < floor:
        return 0
    return best.level


def measure_levels(
    sample: Sequence[bytes],
    mode: str,
    link_bytes_per_s: float,
    cores: int,
    clock: Callable[[], float],
    *,
    passes: int = 1,
    fixed_s_per_byte: float = 0.0,
) -> list[LevelSample]:
    """:func:`measure_ladder` over the mode's levels (:data:`MODE_LEVELS`)."""
    if mode not in MODE_LEVELS:
        raise ValueError(f"unknown link mode {mode!r}; expected one of {sorted(MODE_LEVELS)}")
    return measure_ladder(sample, link_bytes_per_s, cores, clock, MODE_LEVELS[mode],
                          passes=passes, fixed_s_per_byte=fixed_s_per_byte)


def measure_ladder(
    sample: Sequence[bytes],
    link_bytes_per_s: float,
    cores: int,
    clock: Callable[[], float],
    levels: Sequence[int] = LEVELS,
    executor: Executor | None = None,
    *,
    passes: int = 1,
    fixed_s_per_byte: float = 0.0,
) -> list[LevelSample]:
    """Store ``sample`` (chunks of the pages to send) as level 0, the uncompressed floor,
    then compress it at ``levels``, cheapest first, timing each with ``clock``: the
    least time of ``passes`` runs (a run another task interrupted says nothing of the
    level). Stops after the first compressing level at which the CPU, not the link,
    bounds the rate (with ``fixed_s_per_byte`` of other work per byte, as
    :meth:`LevelSample.rate` counts it): every later level is slower still. With
    ``executor`` (``cores`` threads, as the encoders will run) the chunks are compressed
    at once on its threads and the rate per core is the wall-clock rate over ``cores``:
    on a host where other work holds a core, that is what the encoders will get, not one
    idle core's speed."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, not {passes}")
    total = sum(len(c) for c in sample)
    if total == 0:
        raise ValueError("measure_levels needs a non-empty sample")
    out: list[LevelSample] = []
    if executor is not None:
        # start the threads before any is timed (a pool makes them at its first tasks)
        list(executor.map(len, [b""] * cores))
    for level in (0, *(lv for lv in levels if lv != 0)):
        elapsed = float("inf")
        size = total
        for _ in range(passes):
            t0 = clock()
            if level == 0:
                # storing copies each chunk's pages into its frame: time a real copy
                size = sum(len(bytearray(c)) for c in sample)
                took = clock() - t0
            elif executor is not None:
                size = sum(executor.map(lambda c, lv=level: min(len(compress(c, lv)), len(c)),
                                        sample))
                took = (clock() - t0) * cores
            else:
                size = sum(min(len(compress(c, level)), len(c)) for c in sample)
                took = clock() - t0
            elapsed = min(elapsed, max(took, 1e-9))
        s = LevelSample(level, total / elapsed, size / total)
        out.append(s)
        cpu = cores / (1.0 / s.bytes_per_s_per_core + fixed_s_per_byte)
        if level != 0 and cpu < link_bytes_per_s / max(s.ratio, 1e-9):
            break
    return out


class LevelGovernor:
    """The level of each next chunk while a transfer runs, so that the link stays full.

    Sans-I/O: the driver passes the time, the backlog (encoded bytes the link has not
    taken yet: in the node, frames prepared and not yet written to a stream, whose
    socket buffers keep the wire busy meanwhile) and the bytes the link took so far.
    From the latter it measures the rate the link drains at, and from the backlog's
    change over the same interval whether the encoders at this level outrun the link
    (it grows) or fall behind it (it shrinks). The backlog in seconds of that rate says
    how far ahead the encoders are. More than :data:`HIGH_S` ahead and not shrinking:
    the encoders outrun the link, so the next chunks can afford a slower, smaller level
    (one step up :data:`LEVELS`). A backlog that is shrinking does not climb, however
    large: the level already costs the encoders more than the link gives them time for
    (issue 17, task livetbf: on the quiet machine of 2026-12-07 21:00 a 64 MiB window
    of frames encoded at level 9 let the governor climb to 19 while that lead drained,
    and the link ran at 65 % at levels 12-19 once it had). Less ahead than the
    encoders need to finish the chunks they are encoding (:data:`LOW_S`, or a chunk's
    encode time at this level, measured), or shrinking fast enough to run dry within
    that time and :data:`HOLD_S`, while the encoders did not wait: the link is about
    to run dry for want of encoded chunks, so one step down (to store at the bottom:
    never a level slower than sending uncompressed). A backlog that ran low while the
    encoders waited — for plans (the diff had not asked for more) or for room in
    AMST's window (the receiver holds the transfer back) — says nothing of the level
    and moves nothing, nor does one within a chunk's encode and a hold after such a
    wait (the chunks that refill it are being encoded).

    The rule is buffer-based rate adaptation (Huang et al., "A Buffer-Based Approach to
    Rate Adaptation", SIGCOMM 2014: choose from the buffer's occupancy, not from a rate
    estimate) applied to compression as zstd's own ``--adapt`` does (programs/fileio.c:
    a level up when the output cannot keep up, down when the input waits on compression;
    it too judges the trend of its buffers between two checks, not their level alone).
    A step waits :data:`HOLD_S` after the last so that its effect shows in the backlog
    first. A step down is taken only while it is expected to speed the encoders up: once
    the cheaper level was measured (:meth:`encoded`, seconds per logical byte of each
    chunk) and costs more than :data:`CHEAPER` of the current one, the encoders' time is
    not compression's (reading the pages, a starved host) and a cheaper level would only
    send more bytes."""

    #: Backlog above which the level goes up: one second of the link's drain keeps the
    #: link busy through the slowest step's first chunks (a 1 MiB chunk at HDE's level 16
    #: takes ~0.1 s per core, mesh.hde.compressors).
    HIGH_S = 1.0
    #: Backlog below which the level goes down: a quarter second covers a chunk's encode
    #: at the cheap levels and the thread hand-offs, so the link never waits on them.
    LOW_S = 0.25
    #: The least time between two steps: two 1 MiB chunks at 100 Mbit/s.
    HOLD_S = 0.2
    #: The drain rate is measured over at least this long (acks come in bursts of a
    #: window's worth on a fast link).
    RATE_S = 0.2
    #: A cheaper level must cost at most this share of the current one's encode time per
    #: byte to be worth its larger output (zstd's fast levels differ by ~10-30 % in speed,
    #: level 1 against 3 by ~35 %: mesh.hde.level's table above).
    CHEAPER = 0.9
    #: Weight of a chunk's cost in its level's moving average.
    COST_GAIN = 0.25
    #: Weight of an interval's backlog trend in its moving average: chunks of ~1 MiB land
    #: in the backlog one at a time, so a single interval of RATE_S sees a few of them.
    TREND_GAIN = 0.5

    def __init__(self, start: int, levels: Sequence[int] = LEVELS,
                 ceiling: int | None = None) -> None:
        ladder = sorted(set(levels) | {0, start}, key=lambda lv: _ORDER.get(lv, lv))
        if ceiling is not None:
            ladder = [lv for lv in ladder if _rank(lv) <= _rank(ceiling)] or [0]
        self.ladder: tuple[int, ...] = tuple(ladder)
        self._at = self.ladder.index(start) if start in self.ladder else 0
        self._last_step: float | None = None
        #: when the encoders last waited (for a plan or for room), None: never
        self._waited_at: float | None = None
        self._mark: tuple[float, int, int] | None = None
        #: bytes per second the link drained at, last measured (None: not yet)
        self.drain: float | None = None
        #: (time, level) of every step taken, for the round's figures
        self.steps: list[tuple[float, int]] = []
        #: level -> encode seconds per logical byte, a moving average over its chunks
        self.cost: dict[int, float] = {}
        #: level -> seconds one chunk takes to encode there, a moving average
        self.chunk_s: dict[int, float] = {}
        #: bytes per second the backlog grows at (negative: shrinks), a moving average
        self.trend: float | None = None

    def encoded(self, level: int, seconds: float, logical: int) -> None:
        """A chunk of ``logical`` bytes took ``seconds`` to encode at ``level``."""
        if logical <= 0 or seconds < 0:
            return
        c = seconds / logical
        old = self.cost.get(level)
        self.cost[level] = c if old is None else old + self.COST_GAIN * (c - old)
        old = self.chunk_s.get(level)
        self.chunk_s[level] = seconds if old is None else \
            old + self.COST_GAIN * (seconds - old)

    def _worth_stepping_down(self) -> bool:
        here = self.cost.get(self.level)
        below = self.cost.get(self.ladder[self._at - 1])
        return here is None or below is None or below <= self.CHEAPER * here

    @property
    def level(self) -> int:
        return self.ladder[self._at]

    def next_level(self, now: float, backlog: int, drained: int, waited: bool) -> int:
        """The level for the next chunk. ``backlog``: encoded bytes the link has not
        taken; ``drained``: bytes it took so far; ``waited``: the encoder waited for a
        plan or for room (so a low backlog is not the level's doing)."""
        if waited:
            self._waited_at = now
        if self._mark is None:
            self._mark = (now, drained, backlog)
        elif now - self._mark[0] >= self.RATE_S:
            dt = now - self._mark[0]
            rate = (drained - self._mark[1]) / dt
            if rate > 0:
                self.drain = rate
            grow = (backlog - self._mark[2]) / dt
            self.trend = grow if self.trend is None else \
                self.trend + self.TREND_GAIN * (grow - self.trend)
            self._mark = (now, drained, backlog)
        if self.drain is None:
            return self.level
        if self._last_step is not None and now - self._last_step < self.HOLD_S:
            return self.level
        ahead = backlog / self.drain
        # the lead the link needs: the chunks the encoders are on now must be done
        # before the backlog runs out (a 1 MiB chunk at level 19 takes ~0.2 s of an
        # idle core, seconds of a starved one)
        lead = max(self.LOW_S, self.chunk_s.get(self.level, 0.0))
        trend = self.trend
        dry_in = backlog / -trend if trend is not None and trend < 0 else float("inf")
        # a climb is judged on the trend at this level: measured since the last step,
        # and over at least a chunk's encode at it (the chunks begun before the step
        # were still the old level's)
        settled = self._last_step is None or now - self._last_step >= lead
        # the backlog a wait left empty is refilled by the next chunks: a low one within
        # a chunk's encode (and a hold) of the wait is still the wait's doing, not the
        # level's (a grouped round 1 waits seconds for its window's plan; each chunk
        # after it then found the link drained and stepped down: 6 -> -5 under load)
        refilling = self._waited_at is not None and now - self._waited_at < lead + self.HOLD_S
        step = 0
        if ahead > self.HIGH_S and trend is not None and trend >= 0 and settled \
                and self._at + 1 < len(self.ladder):
            step = 1
        elif (ahead < lead or dry_in < lead + self.HOLD_S) and not refilling \
                and self._at > 0 and self._worth_stepping_down():
            step = -1
        if step:
            self._at += step
            self._last_step = now
            # the trend is the new level's from here on
            self.trend, self._mark = None, (now, drained, backlog)
            self.steps.append((now, self.level))
        return self.level


#: Where the negative (fast) levels sit on the ladder: below 1, above store.
_ORDER = {0: -100, -5: -6, -1: -2}


def _rank(level: int) -> int:
    return _ORDER.get(level, level)
