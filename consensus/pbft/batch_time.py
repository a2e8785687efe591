"""Ledger time: the primary stamps each batch with a time, the backups check it.

The ledger measures operator-request freshness and migration deadlines against
*ledger time* (:mod:`consensus.ledger`), which must be the same at every replica
and must advance with the world, not only when an operator's request happens to
carry a timestamp. So the time is part of what PBFT orders:

- the primary of a view stamps each batch it proposes with its wall clock, in
  microseconds (``Batch.time_us``; the PRE-PREPARE's digest covers it), never
  below the time of a batch before it that it knows of (executed, or proposed
  in this view): ledger time never goes back, also across a change of primary
  whose clock is a little behind;
- a backup accepts a fresh PRE-PREPARE only if its time lies within
  ``TIME_BOUND`` of its own wall clock and is not below the time of a batch of
  a lower sequence number that it holds. A time too far *ahead* can only come
  from the primary (a message does not arrive before it was sent): the backup
  refuses it and starts a view change at once. A time too far *behind* may also
  be a PRE-PREPARE that reached us late (a retransmission after a partition):
  the backup refuses to vote and takes the batch's requests as its own pending
  ones, so its request timer suspects the primary unless the batch commits
  without it (then state transfer brings it, and the timer stops);
- execution hands the batch's time to every command of the batch
  (``Ledger.execute(..., now)``), and the ledger's clock only moves forward; a
  batch proposed in one view and re-proposed by a NEW-VIEW keeps its time (the
  digest pins it), so execution is deterministic whatever the views.

So a Byzantine primary can move ledger time by at most ``TIME_BOUND`` from the
clocks of the correct replicas: it cannot make a migration's deadline pass much
early or hold it back much late, nor make fresh operator requests look stale.
A correct DC whose clock is more than ``TIME_BOUND`` off counts as faulty.

The replica's driver gives it the wall clock (``Replica(wall=...)``): the node
runtime's ``now`` is trio's clock, whose origin is arbitrary, so the node maps
it to ``time.time()``; in the simulator ``now`` (virtual time plus the node's
clock offset) is the wall clock.
"""

from __future__ import annotations

from consensus.pbft.messages import Batch, digest
from consensus.pbft.state import ReplicaState
from mesh import wire

__all__ = ["TIME_BOUND", "US", "stamp", "floor_us", "refusal", "time_of"]

#: How far a batch's time may lie from a backup's wall clock. NTP keeps a
#: synchronized host within milliseconds of UTC (RFC 5905 §1 quotes "a few
#: milliseconds" on a LAN, tens on the Internet), so the bound is about what the
#: ledger can afford a liar: a minute is a tenth of a migration's deadline
#: (consensus.ledger.MIGRATION_DEADLINE, 600 s) and a fifth of an operator
#: request's freshness window (consensus.authz.FRESHNESS_WINDOW, 300 s). The
#: simulator's clock nemesis shifts one node by up to 30 s either way
#: (sim.nemesis), so two correct simulated clocks are never more than this apart.
TIME_BOUND = 60.0
#: Microseconds per second (batch times are integers on the wire).
US = 1_000_000


def time_of(st: ReplicaState, data: bytes) -> int:
    """The time stamped on the encoded batch ``data`` (0 if it does not decode: such a
    batch executes as the null request)."""
    batch = st.decoded.get(digest(data))
    if batch is not None:
        return batch.time_us
    try:
        return int(wire.decode(data, expect=(Batch,)).time_us)
    except wire.WireError:
        return 0


def floor_us(st: ReplicaState, seq: int) -> int:
    """The least time a batch at ``seq`` may carry: the ledger's clock (what executed)
    and the time of every batch of a lower sequence number held in this view."""
    low = int(st.ledger.clock * US)
    for s, slot in st.slots.items():
        if s < seq and slot.time_us > low:
            low = slot.time_us
    return low


def stamp(st: ReplicaState, now: float, seq: int) -> int:
    """The primary's time for the batch it proposes at ``seq``."""
    return max(int(st.wall(now) * US), floor_us(st, seq))


def refusal(st: ReplicaState, now: float, seq: int, time_us: int) -> str | None:
    """Why a backup refuses a fresh batch at ``seq`` stamped ``time_us``: ``"ahead"``,
    ``"behind"`` (of its wall clock by more than TIME_BOUND), ``"backwards"`` (below a
    batch before it), or None if the time is acceptable."""
    wall = int(st.wall(now) * US)
    bound = int(TIME_BOUND * US)
    if time_us > wall + bound:
        return "ahead"
    if time_us < wall - bound:
        return "behind"
    if time_us < floor_us(st, seq):
        return "backwards"
    return None
