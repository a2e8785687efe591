"""The pre-copy round policy of a source session: after each round, from what the rounds
measured, whether the VM is fenced now and how hard its guest is throttled. Pure functions
(no clock, no I/O): :class:`federation.migration.source.SourceSession` calls them, in a
node and in the simulator alike.

The figures a round gives (:class:`federation.migration.vocabulary.RoundSent`): the pages
it covered, its wire bytes, its seconds and of them the seconds its pages took to move
(``move_seconds``), and the pages written while it ran. From them:

- the **cost of a page** on the link (:func:`page_cost`): a round's moving time over the
  pages it moved. Round 1 covers every page, most of which the target already held (a
  return trip's round 1 moves ~3 % of them), so its cost per page is taken over its wire
  bytes as whole pages instead: what a dirty page costs if it does not compress (a
  guest's fresh writes often do not; a page that compresses is cheaper, so this errs
  towards one round more, never towards a final round over the limit);
- the **final round's estimate**: the dirty pages at that cost (QEMU's rule,
  migration/migration.c: stop when the pending bytes fit ``bandwidth * downtime-limit``);
- the **guest's dirty rate** without throttle: pages written per second of the round,
  scaled up by the share of time a throttled guest ran.

The rules, in the order :func:`decide` applies them (each has its own unit test in
``tests/test_precopy_policy.py``):

1. **fits**: the final round's estimate is within the downtime limit: fence now. From
   round 1 on (its wire-based cost makes it safe to judge), so a trip whose first round
   left little to send stops there instead of sending a round for nothing.
2. **round cap**: the next round would be the last the link mode allows: fence now.
3. **no progress**: the round left at least :data:`NOT_FALLING` of the dirty pages the
   round before it left, and the throttle can go no higher (at :data:`MAXIMUM`, or the VM
   cannot be throttled): fence now, since another round re-sends the same working set
   (Xen's rule, Clark et al., NSDI 2005, §5: stop when the writable working set will not
   shrink).
4. **converge at once** (auto-converge against the measured link): otherwise, when the
   pages the guest would write during the next round exceed what the final round may
   carry, the throttle goes straight to the share of time that brings them within it
   (:func:`throttle_for`), at least :data:`INITIAL` and at most :data:`MAXIMUM`; when the
   dirty count did not fall it rises by at least :data:`INCREMENT` over the current one.
   QEMU's auto-converge steps 20 % then +10 % per dirty sync that does not fall; with the
   link and the dirty rate measured the step can go to the estimate in one go. The
   throttle never goes down within a migration (the fence, an abort or the commit ends
   it). Round 1 is judged once more before it moves anything
   (:func:`first_round_throttle`): a VM whose dirty pages are found by content reports
   the pages its guest wrote while round 1 copied its shadow; against the link the mesh
   measured, the guest is throttled for the rest of round 1 when it would write more
   than half of what the final round may carry (:data:`FIRST_ROUND_SHARE`) — so that a
   trip whose round 1 is short (a return to a DC that kept its copy) can fence right
   after it. The data plane samples twice: early in the copy (two scans of every page
   bracketing its first ~0.3 s, with the copy's projected length), so the guest is held
   for most of round 1, and once the copy is done.
"""

from __future__ import annotations

import math

import attrs

from mesh.hde.image import PAGE_SIZE

__all__ = ["Decision", "decide", "first_round_throttle", "page_cost", "final_estimate",
           "throttle_for",
           "unthrottled_rate", "NOT_FALLING", "FIRST_ROUND_SHARE", "INITIAL", "INCREMENT",
           "MAXIMUM"]

#: QEMU's auto-converge bounds (migration/options.c: cpu-throttle-initial 20 %,
#: cpu-throttle-increment 10 %, at most 99 %); we stop at 90 % so the guest's own timers
#: and checks still run (federation.vms.throttle duty-cycles the whole process).
INITIAL, INCREMENT, MAXIMUM = 20, 10, 90
#: A round "does not fall" when it left at least this share of the dirty pages the round
#: before it left.
NOT_FALLING = 0.9
#: Round 1's sample throttles the guest to write at most this share of what the final
#: round may carry: every page written after round 1 copied it crosses the link again
#: (a return trip's round 1 moves ~8 MB: the ~3.7 MB a 300 ms final round may carry at
#: 100 Mbit/s would be 45 % more), and the final round shares the stop window with the
#: fence, the device state, the commit and the start (~100 ms of 300 on loopback).
FIRST_ROUND_SHARE = 0.5


@attrs.frozen
class Decision:
    """What to do after a round: ``fence`` now (and why: "fits", "round cap",
    "no progress"), else send another round with the guest throttled to ``throttle``
    percent (0: not throttled)."""

    fence: bool
    throttle: int
    why: str


def page_cost(round_: int, pages: int, wire_bytes: int, seconds: float,
              move_seconds: float | None) -> float:
    """Seconds the link took per page in a round (see the module docstring); 0.0 when
    the round moved nothing to measure."""
    moving = move_seconds if move_seconds is not None else seconds
    if moving <= 0:
        return 0.0
    moved = wire_bytes / PAGE_SIZE if round_ == 1 else pages
    if moved <= 0:
        return 0.0
    return moving / moved


def final_estimate(dirty_pages: int, cost: float) -> float:
    """Seconds the final round's ``dirty_pages`` take at ``cost`` per page (inf when no
    cost was measured and pages are dirty)."""
    if dirty_pages == 0:
        return 0.0
    return dirty_pages * cost if cost > 0 else math.inf


def unthrottled_rate(dirty_pages: int, seconds: float, throttle: int) -> float:
    """Pages per second the guest writes when not throttled, from a round of ``seconds``
    that dirtied ``dirty_pages`` while the guest ran ``100 - throttle`` % of the time."""
    if seconds <= 0:
        return 0.0
    return dirty_pages / seconds / max(0.01, 1 - throttle / 100)


def throttle_for(rate: float, round_seconds: float, budget_pages: float) -> int:
    """The throttle (percent) under which a guest writing ``rate`` pages/s unthrottled
    writes at most ``budget_pages`` during a round of ``round_seconds``: 0 if it already
    does, else between INITIAL and MAXIMUM."""
    written = rate * round_seconds
    if written <= budget_pages:
        return 0
    wanted = math.ceil(100 * (1 - budget_pages / written))
    return max(INITIAL, min(MAXIMUM, wanted))


def first_round_throttle(dirtied: int, seconds: float, elapsed: float, cost: float,
                         downtime: float, preparation: float = 0.0) -> int:
    """Rule 4 at round 1's dirty sample, before the round moves anything: ``dirtied``
    pages written over ``seconds`` of the preparation, ``elapsed`` seconds into the round,
    ``cost`` seconds a page on the link (the mesh's estimate; 0: unknown, no decision),
    ``preparation`` the seconds the whole preparation (the copy of every page into the
    shadow) is expected to take, as projected from its pace so far (0: not known; a
    sample taken early in the copy gives it). Round 1 lasts at least twice its
    preparation, and twice what has elapsed (the copy; its index, the diff and the move
    still to come): the throttle under which the guest writes at most
    :data:`FIRST_ROUND_SHARE` of what the final round may carry in that time."""
    if cost <= 0 or seconds <= 0 or dirtied <= 0:
        return 0
    return throttle_for(dirtied / seconds, 2 * max(elapsed, preparation),
                        FIRST_ROUND_SHARE * downtime / cost)


def decide(*, round_: int, max_rounds: int, downtime: float, dirty: list[int],
           cost: float, seconds: float, overhead: float, throttle: int,
           can_throttle: bool) -> Decision:
    """The decision after round ``round_`` (see the module docstring).

    ``dirty``: the pages each round so far left dirty (this round's last); ``cost``: the
    link's seconds per page; ``seconds``: this round's length; ``overhead``: the seconds
    a round spends beside moving pages (preparing, scanning: the last incremental
    round's, or round 1's until one ran, an upper bound); ``throttle``: the percent
    the guest ran under during this round; ``can_throttle``: whether a higher throttle
    can be had (False once the backend refused one)."""
    pending = dirty[-1]
    if final_estimate(pending, cost) <= downtime:
        return Decision(True, throttle, "fits")
    if round_ + 1 >= max_rounds:
        return Decision(True, throttle, "round cap")
    falling = len(dirty) < 2 or pending < NOT_FALLING * dirty[-2]
    higher = can_throttle and throttle < MAXIMUM
    if not falling and not higher:
        return Decision(True, throttle, "no progress")
    wanted = throttle
    if can_throttle:
        budget = downtime / cost if cost > 0 else 0.0
        rate = unthrottled_rate(pending, seconds, throttle)
        # the next round moves what is dirty now, beside its fixed work
        wanted = max(throttle, throttle_for(rate, pending * cost + overhead, budget))
        if not falling:
            wanted = max(wanted, INITIAL if throttle == 0 else
                         min(MAXIMUM, throttle + INCREMENT))
    return Decision(False, wanted, "converging" if wanted == throttle else "throttle")
