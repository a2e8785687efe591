"""Pure decisions of the node runtime: reconnect backoff and the duplicate-link tie-break.

Both are plain functions of their inputs (the backoff draws from an injected
``random.Random``), so they are unit-tested without sockets and a simulator
may reuse them.
"""

from __future__ import annotations

import random

import attrs

__all__ = ["Backoff", "LinkClaim", "keep_new_link", "BACKOFF_BASE", "BACKOFF_CAP"]

#: First retry window. A control connection on a LAN or loopback completes in
#: well under a millisecond; 100 ms makes the first retry quick while still
#: spreading the dials of a whole federation that restarts at once.
BACKOFF_BASE = 0.1
#: Largest retry window. Issue 2 requires that a restarted peer is reconnected
#: within 10 s; with full jitter the wait after any failure is at most the cap,
#: so 4 s leaves 6 s for the connect and the handshake of the next attempt.
BACKOFF_CAP = 4.0


class Backoff:
    """Exponential backoff with *full jitter*: the n-th retry (n from 0) waits a time
    drawn uniformly from ``[0, min(cap, base * 2**n))``.

    Source: Marc Brooker, "Exponential Backoff and Jitter", AWS Architecture Blog,
    2015. Full jitter spreads the retries of many clients that failed together
    (here: every DC whose link to a crashed peer broke at the same instant) and,
    in that article's simulation, does the least total work of the variants.
    """

    def __init__(
        self, rng: random.Random, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP
    ) -> None:
        if not 0 < base <= cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={base}, cap={cap}")
        self._rng = rng
        self.base = base
        self.cap = cap

    def window(self, attempt: int) -> float:
        """The upper bound of the wait before retry number ``attempt``."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        # 2**attempt overflows a float past ~1024; the cap is reached far earlier.
        return min(self.cap, self.base * 2 ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        return self._rng.uniform(0.0, self.window(attempt))


@attrs.frozen
class LinkClaim:
    """What the tie-break needs to know of one authenticated control connection."""

    initiator: str  # the DC that dialled it
    peer_incarnation: bytes  # random per process start of the peer, sent after the handshake


def keep_new_link(local: str, peer: str, existing: LinkClaim, new: LinkClaim) -> bool:
    """Whether a newly authenticated connection to ``peer`` replaces the existing one.

    Both ends evaluate this on the same two connections and reach the same answer,
    so exactly one connection survives and nothing flaps:

    * a different peer incarnation means the peer restarted: the old connection is
      a leftover of the dead process (its FIN or RST may not have arrived yet), so
      the new one wins — otherwise a restarted peer could be locked out by a
      half-open connection;
    * both dialled by the same DC: that DC dials only when it has no link, so it
      lost the old one; the new one wins;
    * both DCs dialled at once: keep the connection dialled by the DC whose name
      sorts first (Erlang distribution also settles simultaneous connects by comparing
      node names, see its "Distribution Protocol" handshake, status ``nok``).
    """
    if new.peer_incarnation != existing.peer_incarnation:
        return True
    if new.initiator == existing.initiator:
        return True
    return new.initiator == min(local, peer)
