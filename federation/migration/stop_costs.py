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
and commit 34 ms, its start 46 ms).

A node keeps a short history of what it measured (:class:`StopHistory`): the last
:data:`HISTORY` figures of each kind, of each VM and of the node as a whole, written to
the node's store (:data:`STORE_KEY`, so a restart keeps them) and bounded
(:data:`HISTORY` figures, :data:`VMS` VMs). The reserve takes each figure's recent
maximum, of this VM where it has one, else of any VM at this node: one lucky run (a
quick fence on an idle machine) does not shrink the reserve the next migration is
judged with, and below :data:`TRUSTED` measurements the prior stays a floor under it.
Under load the stop window's parts vary by 2-5x from one migration to the next
(docs/BENCHMARKS.md, the stop windows of 2026-12-08), so the last figure alone is the
wrong one half of the time.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from mesh.core import Store

__all__ = ["StopCosts", "StopEstimate", "StopHistory", "PRIOR", "START_PRIOR", "BIAS_MIN",
           "BIAS_MAX", "BIAS_PAGES", "HISTORY", "TRUSTED", "VMS", "STORE_KEY",
           "costs_of_arrival", "final_round_costs", "encode_history", "decode_history"]

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


#: Figures of each kind kept per VM and for the node (the reserve is their maximum).
HISTORY = 8
#: Below this many measurements of a figure the prior stays a floor under it.
TRUSTED = 3
#: VMs whose own figures are kept (the ones measured last); the node's go on regardless.
VMS = 64
#: The node store's key of the history (one record, rewritten at each measurement).
STORE_KEY = "stop_costs/history"
#: The history's scope of the node as a whole (a VM's name is never empty).
NODE = ""
_FIELDS = tuple(f.name for f in attrs.fields(StopCosts))

#: scope (a VM, or :data:`NODE`) -> figure name -> its last measurements, oldest first
Samples = dict[str, dict[str, list[float]]]


class StopHistory:
    """A node's last measured stop-window costs, per VM and of the node as a whole (see
    the module docstring). With a ``store`` they are read from it at the start and
    written to it at each measurement; a record it cannot read is set aside
    (``load_error`` says why) and the history starts from the prior."""

    def __init__(self, prior: StopCosts = PRIOR, store: Store | None = None) -> None:
        if None in attrs.astuple(prior):
            raise ValueError("the stop window's prior needs every figure")
        self.prior = prior
        self.store = store
        #: each VM's last measured figures, and the node's (what was measured last)
        self.by_vm: dict[str, StopCosts] = {}
        self.latest = StopCosts()
        self.samples: Samples = {}
        self.load_error = ""
        raw = store.get(STORE_KEY) if store is not None else None
        if raw is not None:
            try:
                self.samples = decode_history(raw)
            except ValueError as exc:
                self.load_error = f"{STORE_KEY}: {exc}"
        for scope, figures in self.samples.items():
            last = StopCosts(**{k: v[-1] for k, v in figures.items() if v})
            if scope == NODE:
                self.latest = last
            else:
                self.by_vm[scope] = last

    def record(self, vm: str, costs: StopCosts) -> None:
        """Figures measured in a migration of ``vm`` (at either end; a VM without a name,
        which the ledger never admits, counts for the node only)."""
        costs = _checked(costs)
        if vm:
            self.by_vm[vm] = self.by_vm.get(vm, StopCosts()).merged(costs)
        self.latest = self.latest.merged(costs)
        measured = {k: v for k, v in attrs.asdict(costs).items() if v is not None}
        if not measured:
            return
        scopes = [self.samples.setdefault(NODE, {})]
        if vm:
            own = self.samples.pop(vm, {})
            self.samples[vm] = own  # the VM measured last, kept longest
            scopes.append(own)
        for scope in scopes:
            for k, v in measured.items():
                scope.setdefault(k, []).append(v)
                del scope[k][:-HISTORY]
        for old in [k for k in self.samples if k != NODE][:-VMS]:
            del self.samples[old]
            self.by_vm.pop(old, None)
        if self.store is not None:
            # not synced: a crash loses at most the last figures, and the prior or the
            # figures before stand for them
            self.store.put(STORE_KEY, encode_history(self.samples), sync=False)

    def estimate(self, vm: str) -> StopEstimate:
        """The reserve and bias for the next migration of ``vm`` from here: each figure's
        recent maximum, the VM's own where it has any, else the node's; the prior's
        while fewer than :data:`TRUSTED` were measured and the prior is larger."""
        own = self.samples.get(vm, {}) if vm else {}
        node = self.samples.get(NODE, {})
        chosen: dict[str, float] = {}
        measured: list[str] = []
        for name in _FIELDS:
            got = own.get(name) or node.get(name) or []
            prior = float(getattr(self.prior, name))
            if got:
                measured.append(name)
                top = max(got)
                chosen[name] = top if len(got) >= TRUSTED else max(top, prior)
            else:
                chosen[name] = prior
        costs = StopCosts(**chosen)
        assert costs.fence_s is not None and costs.final_fixed_s is not None
        assert costs.after_s is not None and costs.bias is not None
        return StopEstimate(costs.fence_s + costs.final_fixed_s + costs.after_s,
                            costs.bias, costs, tuple(measured))

    def summary(self) -> dict[str, Any]:
        """What ``dwcp status`` shows: the reserve a migration from here would be judged
        with (the node's figures), how many of each figure it was taken from, and the
        last of each."""
        est = self.estimate(NODE)
        node = self.samples.get(NODE, {})
        return {"reserve_ms": round(est.reserve * 1000, 1), "bias": round(est.bias, 3),
                "reserved_ms": {k: round(float(getattr(est.costs, k)) * 1000, 1)
                                for k in _FIELDS if k != "bias"},
                "measured": {k: len(node.get(k, [])) for k in _FIELDS},
                "last_ms": {k: round(node[k][-1] * 1000, 1)
                            for k in _FIELDS if k != "bias" and node.get(k)},
                "history": HISTORY, "trusted": TRUSTED, "vms": len(self.samples) - (
                    NODE in self.samples),
                **({"load_error": self.load_error} if self.load_error else {})}


def encode_history(samples: Samples) -> bytes:
    """The history as the node stores it (JSON: one object per scope, in the order the
    VMs were last measured, which decides the next one dropped)."""
    return json.dumps(samples, separators=(",", ":")).encode()


def decode_history(raw: bytes) -> Samples:
    """A stored history, checked: at most :data:`VMS` VMs and the node, figures of
    :class:`StopCosts` only, at most :data:`HISTORY` finite ones each, times at least 0,
    biases within their bounds. ValueError names what is wrong."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"expected an object of scopes, got {type(doc).__name__}")
    if len(doc) > VMS + 1:
        raise ValueError(f"{len(doc)} scopes, more than {VMS} VMs and the node")
    out: Samples = {}
    for scope, figures in doc.items():
        if not isinstance(figures, dict):
            raise ValueError(f"scope {scope!r}: expected an object of figures")
        out[scope] = {}
        for name, values in figures.items():
            where = f"scope {scope!r}, figure {name!r}"
            if name not in _FIELDS:
                raise ValueError(f"{where}: not a stop-window figure ({', '.join(_FIELDS)})")
            if not isinstance(values, list) or len(values) > HISTORY:
                raise ValueError(f"{where}: expected a list of at most {HISTORY} numbers")
            for v in values:
                if (isinstance(v, bool) or not isinstance(v, (int, float))
                        or not math.isfinite(v)):
                    raise ValueError(f"{where}: {v!r} is not a finite number")
                low, high = (BIAS_MIN, BIAS_MAX) if name == "bias" else (0.0, math.inf)
                if not low <= v <= high:
                    raise ValueError(f"{where}: {v!r} is outside [{low}, {high}]")
            out[scope][name] = [float(v) for v in values]
    return out


def _checked(costs: StopCosts) -> StopCosts:
    """Figures that a clock can give: negative times (a wall clock stepped back between
    two marks) are dropped, the bias is kept within its bounds."""
    def time(v: float | None) -> float | None:
        return v if v is not None and math.isfinite(v) and v >= 0 else None
    bias = costs.bias
    if bias is not None:
        bias = min(BIAS_MAX, max(BIAS_MIN, bias)) if bias > 0 and math.isfinite(bias) else None
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
