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

1. **fits**: the final round's estimate is within what the downtime limit leaves it once
   the stop window's fixed part is reserved (:func:`final_budget`; QEMU's rule counts the
   transfer alone, but a node's stop window also holds the source's stop, device state
   and root and the target's verification, commit and start: on the quiet loopback of
   2026-12-08 ~180 ms of a 365 ms window), the estimate corrected by the last final
   round's measured bias: fence now. From
   round 1 on (its wire-based cost makes it safe to judge), so a trip whose first round
   left little to send stops there instead of sending a round for nothing.
2. **round cap**: the next round would be the last the link mode allows: fence now.
3. **no progress**: the round left at least :data:`NOT_FALLING` of the dirty pages the
   round before it left, and the throttle can go no higher (at :data:`MAXIMUM`, or at
   the session's ceiling where it has a higher one, or the VM cannot be throttled):
   fence now, since another round re-sends the same working set
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
           "throttle_for", "final_budget",
           "unthrottled_rate", "NOT_FALLING", "FIRST_ROUND_SHARE", "INITIAL", "INCREMENT",
           "MAXIMUM", "HARD_MAXIMUM"]

#: QEMU's auto-converge bounds (migration/options.c: cpu-throttle-initial 20 %,
#: cpu-throttle-increment 10 %, at most 99 %); we stop at 90 % so the guest's own timers
#: and checks still run (federation.vms.throttle duty-cycles the whole process).
INITIAL, INCREMENT, MAXIMUM = 20, 10, 90
#: QEMU's own ceiling (cpu-throttle-percentage at most 99): where the session is given it
#: (a guest with a downtime limit of its own, the node's qemu VMs), a guest whose dirty
#: pages at :data:`MAXIMUM` still do not fit is throttled up to here before the round
#: policy fences over the limit (rule 3 waits for it).
HARD_MAXIMUM = 99
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


def throttle_for(rate: float, round_seconds: float, budget_pages: float,
                 ceiling: int = MAXIMUM) -> int:
    """The throttle (percent) under which a guest writing ``rate`` pages/s unthrottled
    writes at most ``budget_pages`` during a round of ``round_seconds``: 0 if it already
    does, else between INITIAL and ``ceiling``."""
    written = rate * round_seconds
    if written <= budget_pages:
        return 0
    wanted = math.ceil(100 * (1 - budget_pages / written))
    return max(INITIAL, min(ceiling, wanted))


def final_budget(downtime: float, reserve: float) -> float:
    """Seconds the final round's pages may take: the downtime limit less ``reserve``, the
    stop window's fixed part (the source's stop, device state and root, the target's
    verification, commit and start; :class:`federation.migration.stop_costs.StopHistory`
    measures it), never below none."""
    return max(0.0, downtime - reserve)


def first_round_throttle(dirtied: int, seconds: float, elapsed: float, cost: float,
                         downtime: float, preparation: float = 0.0, reserve: float = 0.0,
                         bias: float = 1.0) -> int:
    """Rule 4 at round 1's dirty sample, before the round moves anything: ``dirtied``
    pages written over ``seconds`` of the preparation, ``elapsed`` seconds into the round,
    ``cost`` seconds a page on the link (the mesh's estimate; 0: unknown, no decision),
    ``preparation`` the seconds the whole preparation (the copy of every page into the
    shadow) is expected to take, as projected from its pace so far (0: not known; a
    sample taken early in the copy gives it). Round 1 lasts at least twice its
    preparation, and twice what has elapsed (the copy; its index, the diff and the move
    still to come): the throttle under which the guest writes at most
    :data:`FIRST_ROUND_SHARE` of what the final round may carry in that time (the limit
    less the stop window's fixed ``reserve``, at ``bias`` times ``cost`` a page: see
    :func:`decide`)."""
    if cost <= 0 or seconds <= 0 or dirtied <= 0:
        return 0
    return throttle_for(dirtied / seconds, 2 * max(elapsed, preparation),
                        FIRST_ROUND_SHARE * final_budget(downtime, reserve) / (cost * bias))


def decide(*, round_: int, max_rounds: int, downtime: float, dirty: list[int],
           cost: float, seconds: float, overhead: float, throttle: int,
           can_throttle: bool, reserve: float = 0.0, bias: float = 1.0,
           ceiling: int = MAXIMUM) -> Decision:
    """The decision after round ``round_`` (see the module docstring).

    ``dirty``: the pages each round so far left dirty (this round's last); ``cost``: the
    link's seconds per page; ``seconds``: this round's length; ``overhead``: the seconds
    a round spends beside moving pages (preparing, scanning: the last incremental
    round's, or round 1's until one ran, an upper bound); ``throttle``: the percent
    the guest ran under during this round; ``can_throttle``: whether a higher throttle
    can be had (False once the backend refused one).

    The stop window is the final round *and* fixed work around it: ``reserve`` seconds of
    it (the fence's stop, device state and root; the target's verification, commit and
    start, as measured) are taken off the limit before the final round's estimate is
    judged, and the estimate is ``bias`` times the pages at ``cost`` (a final round
    measured against its estimate: what moving a stopped guest's pages really took).
    ``ceiling``: the throttle the guest may be driven to when :data:`MAXIMUM` does not
    bring its dirty pages within the budget (:data:`HARD_MAXIMUM` for a guest with a
    downtime limit of its own); up to :data:`MAXIMUM` first, beyond it only from there.
    With reserve 0, bias 1 and the ceiling at MAXIMUM this is the rule without them."""
    pending = dirty[-1]
    budget_s = final_budget(downtime, reserve)
    if final_estimate(pending, cost) * bias <= budget_s:
        return Decision(True, throttle, "fits")
    if round_ + 1 >= max_rounds:
        return Decision(True, throttle, "round cap")
    falling = len(dirty) < 2 or pending < NOT_FALLING * dirty[-2]
    top = MAXIMUM if throttle < MAXIMUM else max(MAXIMUM, ceiling)
    higher = can_throttle and throttle < top
    if not falling and not higher:
        return Decision(True, throttle, "no progress")
    wanted = throttle
    if can_throttle:
        budget = budget_s / (cost * bias) if cost > 0 else 0.0
        rate = unthrottled_rate(pending, seconds, throttle)
        # the next round moves what is dirty now, beside its fixed work
        wanted = max(throttle, throttle_for(rate, pending * cost + overhead, budget, top))
        if not falling:
            wanted = max(wanted, INITIAL if throttle == 0 else
                         min(top, throttle + INCREMENT))
    return Decision(False, wanted, "converging" if wanted == throttle else "throttle")
