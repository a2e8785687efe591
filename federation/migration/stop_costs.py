"""The fixed part of a migration's stop window, as a node measured it: what the round
policy (:func:`federation.migration.precopy.decide`) reserves out of the downtime limit
before it judges whether the final round fits. Pure (no clock, no I/O): the source
session measures its side with its own ``now``, the node adds what its arrivals measured,
and the node core asks for an estimate when it plans a migration.

A stop window (the source's QMP ``stop`` to the target's ``cont``) is the final round's
pages on the link and fixed work around them:

- ``fence_s``: the source's fence, from the session asking it to the fenced root (the VM
  worker's wait, QMP ``stop``, the device state saved beside the root's catch-up);
- ``final_fixed_s``: what the final round took beyond its estimate (its pages at the
  cost a page the fence was judged at): its plan, the target's readiness, the chunks'
  latency, the target's root and verdict;
- ``after_s``: from the final round's end to the guest's ``cont`` at the target (its
  verification, the ledger's commit with the device state loaded beside it, the start).
  A target measures it exactly (its arrival's ``stop_window_ms``); a source sees the
  commit in its ledger but not the target's ``cont``, so its own view adds
  :data:`START_PRIOR`;

and ``bias``: the final round's time over its estimate where it was *faster* than
estimated (else 1: the excess is counted in ``final_fixed_s``). The final round's excess
over its estimate is taken as fixed, not as a factor on its pages: under load
(2026-12-08 01:11, load 20) a final round of 654 pages estimated at 63 ms took 470 ms,
13.7 times the estimate, nearly all of it the round's latency through both nodes (a
factor would have over-reserved a large final round and, bounded, under-reserved a small
one); on the quiet machine 2,793 pages estimated at 156 ms took 180 ms.

Until a node measured a figure, :data:`PRIOR` stands for it: the quiet-machine stop
window of 2026-12-08 (docs/BENCHMARKS.md, "Why the loopback downtime is over 300 ms in
this run": the source's stop, device state and root 103 ms; the final round 180 ms for
2,793 pages estimated at 0.056 ms a page, 156 ms; the target's verification, device load
and commit 34 ms, its start 46 ms). Each later figure is the last one
measured, of this VM where it has one, else of any VM at this node.
"""

from __future__ import annotations

import attrs

__all__ = ["StopCosts", "StopEstimate", "StopHistory", "PRIOR", "START_PRIOR", "BIAS_MIN",
           "BIAS_MAX", "BIAS_PAGES", "costs_of_arrival", "final_round_costs"]

#: The target's start (its ``cont``) as a source's own view of the window counts it: the
#: quiet loopback's 46 ms (a source does not see the target's ``cont``).
START_PRIOR = 0.05
#: A measured bias is kept within these bounds: a final round of a few pages measures
#: mostly its latency, which says little about the next one's pages.
BIAS_MIN, BIAS_MAX = 0.5, 3.0
#: Below this many pages a final round's bias is not measured (see BIAS_MIN).
BIAS_PAGES = 64


@attrs.frozen
class StopCosts:
    """The fixed parts of one stop window and the final round's bias (None: not measured
    by this side; see the module docstring)."""

    fence_s: float | None = None
    final_fixed_s: float | None = None
    after_s: float | None = None
    bias: float | None = None

    def merged(self, newer: StopCosts) -> StopCosts:
        """These costs with every figure ``newer`` measured taken from it."""
        return StopCosts(*(b if b is not None else a
                           for a, b in zip(attrs.astuple(self), attrs.astuple(newer),
                                           strict=True)))


#: What a node reserves before it measured anything (see the module docstring).
PRIOR = StopCosts(fence_s=0.10, final_fixed_s=0.025, after_s=0.08, bias=1.0)


@attrs.frozen
class StopEstimate:
    """What a migration's round policy is given: ``reserve`` seconds of the stop window
    that are not the final round's pages, the final round's ``bias``, and the figures
    they came from (``measured``: the names of those this node measured; the rest are
    the prior's)."""

    reserve: float
    bias: float
    costs: StopCosts
    measured: tuple[str, ...]


class StopHistory:
    """A node's last measured stop-window costs, per VM and of the node as a whole."""

    def __init__(self, prior: StopCosts = PRIOR) -> None:
        if None in attrs.astuple(prior):
            raise ValueError("the stop window's prior needs every figure")
        self.prior = prior
        self.by_vm: dict[str, StopCosts] = {}
        self.latest = StopCosts()

    def record(self, vm: str, costs: StopCosts) -> None:
        """Figures measured in a migration of ``vm`` (at either end)."""
        costs = _checked(costs)
        self.by_vm[vm] = self.by_vm.get(vm, StopCosts()).merged(costs)
        self.latest = self.latest.merged(costs)

    def estimate(self, vm: str) -> StopEstimate:
        """The reserve and bias for the next migration of ``vm`` from here."""
        own = self.by_vm.get(vm, StopCosts())
        chosen: dict[str, float] = {}
        measured: list[str] = []
        for field in attrs.fields(StopCosts):
            got = getattr(own, field.name)
            if got is None:
                got = getattr(self.latest, field.name)
            if got is None:
                got = getattr(self.prior, field.name)
            else:
                measured.append(field.name)
            chosen[field.name] = float(got)
        costs = StopCosts(**chosen)
        assert costs.fence_s is not None and costs.final_fixed_s is not None
        assert costs.after_s is not None and costs.bias is not None
        return StopEstimate(costs.fence_s + costs.final_fixed_s + costs.after_s,
                            costs.bias, costs, tuple(measured))


def _checked(costs: StopCosts) -> StopCosts:
    """Figures that a clock can give: negative times (a wall clock stepped back between
    two marks) are dropped, the bias is kept within its bounds."""
    def time(v: float | None) -> float | None:
        return v if v is not None and v >= 0 else None
    bias = costs.bias
    if bias is not None:
        bias = min(BIAS_MAX, max(BIAS_MIN, bias)) if bias > 0 else None
    return StopCosts(time(costs.fence_s), time(costs.final_fixed_s), time(costs.after_s),
                     bias)


def final_round_costs(seconds: float, pages: int, cost: float
                      ) -> tuple[float | None, float | None]:
    """``final_fixed_s`` and ``bias`` of a final round of ``pages`` that took ``seconds``,
    estimated at ``cost`` seconds a page (see the module docstring); None where there is
    nothing to measure by (no cost; a bias only over :data:`BIAS_PAGES` pages or more)."""
    if cost <= 0 or seconds < 0:
        return None, None
    estimate = pages * cost
    big = pages >= BIAS_PAGES
    if seconds >= estimate:
        return seconds - estimate, 1.0 if big else None
    return 0.0, seconds / estimate if big else None


def costs_of_arrival(stop_window_ms: dict[str, float]) -> StopCosts:
    """A target's measured ``after_s`` from its arrival's ``stop_window_ms`` (the VM
    actions' ``verify_ms``, ``commit_ms`` and ``start_ms``); nothing if one is missing."""
    try:
        ms = sum(float(stop_window_ms[k]) for k in ("verify_ms", "commit_ms", "start_ms"))
    except (KeyError, TypeError, ValueError):
        return StopCosts()
    return StopCosts(after_s=ms / 1000)
