"""How many streams and how large a chunk: AMST's link-mode bounds and the stream-count
controller.

The link mode (DESIGN.md, "Link modes") picks the bounds and the starting count; the
measured bandwidth-delay product raises the count to what the path needs; then a
hill climb adds a stream while throughput grows and drops it again when it does
not. Everything here is pure: no clock, no I/O.
"""

from __future__ import annotations

import math

import attrs

__all__ = [
    "MODES",
    "StreamBounds",
    "STREAM_BOUNDS",
    "STREAM_WINDOW_BYTES",
    "streams_for_bdp",
    "chunk_bytes_for_loss",
    "StreamController",
]

MODES = ("datacenter", "hybrid", "internet")


@attrs.frozen
class StreamBounds:
    minimum: int
    initial: int
    maximum: int

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError(f"stream bounds must satisfy 1 <= min <= initial <= max, got {self}")

    def clamp(self, n: int) -> int:
        return max(self.minimum, min(self.maximum, n))


STREAM_BOUNDS: dict[str, StreamBounds] = {
    # Datacenter (RTT < 10 ms, >= 1 Gbit/s): the BDP (10 Gbit/s x 1 ms = 1.25 MB) fits in one
    # TCP window, so extra streams buy CPU parallelism for compression and encryption, not
    # bandwidth. QEMU's multifd starts with 2 channels (qapi/migration.json: multifd-channels
    # default 2); 4 is twice the cores of the 2-core reference machine.
    "datacenter": StreamBounds(minimum=1, initial=2, maximum=4),
    # Hybrid (10-50 ms, 0.1-1 Gbit/s): BDP up to 1 Gbit/s x 50 ms = 6.25 MB, about two
    # default Linux TCP windows (STREAM_WINDOW_BYTES), with room for the hill climb above.
    "hybrid": StreamBounds(minimum=2, initial=4, maximum=8),
    # Internet (> 50 ms or > 1 % loss): one TCP stream gets about MSS / (RTT * sqrt(p))
    # (Mathis et al., CCR 1997), so parallel streams multiply it; GridFTP studies (Hacker,
    # Athey & Noble, IPDPS 2002; Yildirim, Yin & Kosar, IEEE TPDS 2011) find wide-area
    # optima between about 4 and 16 streams.
    "internet": StreamBounds(minimum=2, initial=8, maximum=16),
}

#: The largest window one TCP connection reaches with Linux defaults: tcp_rmem max 6 MiB,
#: of which tcp_adv_win_scale=1 advertises half (Documentation/networking/ip-sysctl.rst).
#: A stream therefore moves at most about this many bytes per RTT.
STREAM_WINDOW_BYTES = 3 * 1024 * 1024


def streams_for_bdp(bdp_bytes: float, bounds: StreamBounds) -> int:
    """Streams needed so that their windows together cover the bandwidth-delay product."""
    if bdp_bytes <= 0:
        return bounds.minimum
    return bounds.clamp(math.ceil(bdp_bytes / STREAM_WINDOW_BYTES))


#: Chunk sizes by loss. 1 MiB is HDE's chunk (DESIGN.md) and holds below the datacenter loss
#: bound (0.1 %). Under loss a chunk is held up by TCP retransmissions, and a broken stream or a
#: refused chunk costs a whole chunk again; quartering it per decade of loss keeps that cost near
#: constant while 64 KiB still amortises the 100-byte frame header to under 0.2 %.
CHUNK_MAX = 1024 * 1024
CHUNK_HYBRID = 256 * 1024
CHUNK_MIN = 64 * 1024


def chunk_bytes_for_loss(loss: float) -> int:
    """The chunk size to pack for a path with ``loss`` (a fraction, 0.01 = 1 %)."""
    if loss < 0.001:  # the datacenter loss bound of DESIGN.md's mode table
        return CHUNK_MAX
    if loss < 0.01:  # the internet loss bound
        return CHUNK_HYBRID
    return CHUNK_MIN


class StreamController:
    """A hill climb over the stream count: add a stream while throughput grows, drop the
    added one when it did not help, wait, and try again (the adaptive parallelism of
    Yildirim et al., applied online)."""

    #: An added stream stays only if throughput rose by 10 %. Interval-to-interval noise of the
    #: loopback benchmark at a constant stream count was within +-5 %, so 10 % is a real gain.
    GAIN = 1.10
    #: After a probe that did not pay, hold this many intervals before probing again, so a
    #: CPU-bound or source-bound transfer is not churned (8 intervals = 4 s at the 0.5 s floor).
    HOLD_INTERVALS = 8

    def __init__(self, bounds: StreamBounds, initial: int) -> None:
        self.bounds = bounds
        self.target = bounds.clamp(initial)
        self._baseline: float | None = None
        self._probing = False
        self._hold = 0
        self.history: list[tuple[int, float]] = []

    def raise_to(self, n: int) -> None:
        """The path needs at least ``n`` streams (from its bandwidth-delay product)."""
        self.target = max(self.target, self.bounds.clamp(n))

    def observe(self, throughput: float) -> int:
        """Throughput of one interval during which the transport, not the source, was the
        limit; returns the new target stream count."""
        self.history.append((self.target, throughput))
        if self._probing:
            assert self._baseline is not None
            if throughput >= self._baseline * self.GAIN:
                self._baseline = throughput
                if self.target < self.bounds.maximum:
                    self.target += 1
                else:
                    self._probing = False
            else:
                self.target = max(self.bounds.minimum, self.target - 1)
                self._probing = False
                self._hold = self.HOLD_INTERVALS
                self._baseline = None
            return self.target
        if self._hold > 0:
            self._hold -= 1
            return self.target
        if self.target < self.bounds.maximum:
            self._baseline = throughput
            self._probing = True
            self.target += 1
        return self.target
