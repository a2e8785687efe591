"""Link modes: the datacenter / internet / hybrid classifier of DESIGN.md, with hysteresis.

| mode       | when                                                         |
|------------|--------------------------------------------------------------|
| datacenter | RTT < 10 ms and bandwidth >= 1 Gbit/s and loss < 0.1 %       |
| internet   | RTT > 50 ms or bandwidth < 100 Mbit/s or loss > 1 %          |
| hybrid     | anything between                                             |

A link whose bandwidth was never measured cannot be shown to reach 1 Gbit/s, so it is
not a datacenter link; an unmeasured bandwidth does not make it an internet link either.

A link's mode changes only after ``hysteresis`` consecutive estimates all classify it
the same new way; each change is a :class:`~mesh.core.Notify` ``("link-mode", ...)``
and is counted in :attr:`ModeClassifier.switches`. The thresholds come from the
federation file (``[modes]``); this module takes them as :class:`ModeLimits`, a copy
of ``federation.config.ModeThresholds`` (mesh does not import federation).
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from mesh.core import Notify

__all__ = ["Mode", "ModeLimits", "classify", "ModeClassifier"]


class Mode(enum.Enum):
    DATACENTER = "datacenter"
    HYBRID = "hybrid"
    INTERNET = "internet"


@attrs.frozen
class ModeLimits:
    """DESIGN.md "Link modes"; the federation file's ``[modes]`` table
    (``federation.config.ModeThresholds`` is this class). The defaults are DESIGN.md's
    table: a datacenter link is what a metro fabric gives (sub-10 ms, >= 1 Gbit/s,
    < 0.1 % loss); an internet path is what public transit between regions gives
    (> 50 ms, < 100 Mbit/s or > 1 % loss)."""

    datacenter_rtt_ms: float = 10.0
    datacenter_bandwidth_mbps: float = 1000.0
    datacenter_loss: float = 0.001
    internet_rtt_ms: float = 50.0
    internet_bandwidth_mbps: float = 100.0
    internet_loss: float = 0.01
    #: A mode change must hold for this many consecutive estimates. Three is the
    #: smallest count that rides out one outlier on either side of a true change.
    hysteresis: int = 3

    def __attrs_post_init__(self) -> None:
        if self.hysteresis < 1:
            raise ValueError(f"modes.hysteresis must be >= 1, got {self.hysteresis}")
        if not self.datacenter_rtt_ms <= self.internet_rtt_ms:
            raise ValueError("modes: datacenter_rtt_ms must not exceed internet_rtt_ms")

    @classmethod
    def from_thresholds(cls, thresholds: Any) -> ModeLimits:
        """Copy any object with ModeThresholds' attribute names (the federation's)."""
        return cls(**{f.name: getattr(thresholds, f.name) for f in attrs.fields(cls)})


def classify(limits: ModeLimits, rtt_ms: float, bw_mbps: float | None, loss: float) -> Mode:
    if (
        rtt_ms > limits.internet_rtt_ms
        or loss > limits.internet_loss
        or (bw_mbps is not None and bw_mbps < limits.internet_bandwidth_mbps)
    ):
        return Mode.INTERNET
    if (
        rtt_ms < limits.datacenter_rtt_ms
        and loss < limits.datacenter_loss
        and bw_mbps is not None
        and bw_mbps >= limits.datacenter_bandwidth_mbps
    ):
        return Mode.DATACENTER
    return Mode.HYBRID


class ModeClassifier:
    """The mode of every directed link, held against single outliers."""

    def __init__(self, limits: ModeLimits = ModeLimits()) -> None:
        self.limits = limits
        self.modes: dict[tuple[str, str], Mode] = {}
        self._pending: dict[tuple[str, str], tuple[Mode, int]] = {}
        self.switches = 0

    def mode(self, src: str, dst: str) -> Mode | None:
        return self.modes.get((src, dst))

    def observe(
        self, src: str, dst: str, rtt_ms: float, bw_mbps: float | None, loss: float
    ) -> list[Notify]:
        """One new estimate of src -> dst; returns a Notify when the mode changes."""
        link = (src, dst)
        seen = classify(self.limits, rtt_ms, bw_mbps, loss)
        current = self.modes.get(link)
        if current is None:
            self.modes[link] = seen
            return [Notify("link-mode", {"src": src, "dst": dst, "mode": seen.value, "was": None})]
        if seen == current:
            self._pending.pop(link, None)
            return []
        candidate, count = self._pending.get(link, (seen, 0))
        count = count + 1 if candidate == seen else 1
        if count < self.limits.hysteresis:
            self._pending[link] = (seen, count)
            return []
        self._pending.pop(link, None)
        self.modes[link] = seen
        self.switches += 1
        return [Notify("link-mode", {"src": src, "dst": dst, "mode": seen.value,
                                     "was": current.value})]
