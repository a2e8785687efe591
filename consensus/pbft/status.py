"""STATUS: periodic progress reports, and what a peer answers (TOCS'02 §5.2).

Every replica multicasts a signed STATUS (view, active, last executed, stable
checkpoint) every ``status_interval`` while it is busy, and now and then when
idle. A peer that learns from it that the sender is behind helps:

- a sender in an older view (or still changing view) gets the NEW-VIEW that
  brought this replica into its view (kept in the durable log, so also after a
  restart) and this replica's messages of the view so far, or, while this
  replica changes view itself, its own VIEW-CHANGE;
- a sender in the same view at the same height gets this replica's messages
  for the sequence numbers still in progress (lost PRE-PREPAREs, PREPAREs,
  COMMITs are repaired without a view change);
- a replica that sees a peer ahead of it asks for state
  (:func:`consensus.pbft.checkpoint.request_state`).
"""

from __future__ import annotations

from consensus.pbft import checkpoint, transfer, viewchange
from consensus.pbft.messages import Envelope, Status, relay
from consensus.pbft.outbox import Outbox
from consensus.pbft.state import ReplicaState

__all__ = ["status_message", "busy", "on_status", "retransmit_slots"]


def status_message(st: ReplicaState, out: Outbox) -> Envelope:
    st.count("status_signed")
    return out.sign(Status(st.view, st.active, st.last_exec, st.low))


def busy(st: ReplicaState) -> bool:
    """Whether a STATUS is due every interval: requests wait, a view change runs,
    or sequence numbers are in progress. An idle federation sends one every
    ``IDLE_STATUS_EVERY`` intervals (:mod:`consensus.pbft.replica`); peers answer a
    STATUS that shows its sender behind with their own, so the sender learns
    what it misses."""
    return bool(st.pending or not st.active or st.fetching or st.in_flight()
                or any(s > st.last_exec for s in st.slots))


def on_status(st: ReplicaState, out: Outbox, now: float, peer: str, sts: Status) -> None:
    st.ahead[peer] = max(sts.last_executed, sts.stable_seq)
    if st.ahead[peer] > st.last_exec:
        checkpoint.request_state(st, out, now)
    if not transfer.rate_ok(st, now, "status/" + peer):
        return
    behind = sts.view < st.view or (sts.view == st.view and not sts.active)
    if behind or sts.last_executed < st.last_exec or sts.view > st.view:
        out.send(peer, status_message(st, out))  # let it see how far ahead we are
    if behind:
        if st.active and st.new_view_msg is not None:
            out.send(peer, st.new_view_msg)
            retransmit_slots(st, out, peer)  # what it missed of this view so far
        elif not st.active:
            viewchange.resend_view_change(st, out, peer)
    elif sts.view == st.view and sts.active and st.active:
        if sts.last_executed == st.last_exec:
            retransmit_slots(st, out, peer)


def retransmit_slots(st: ReplicaState, out: Outbox, peer: str) -> None:
    """Our messages for the sequence numbers in progress: the PRE-PREPAREs we proposed,
    our PREPAREs and COMMITs (to a peer at our height, or to all after a restart)."""
    for seq in sorted(st.slots):
        slot = st.slots[seq]
        if seq <= st.last_exec or slot.pp is None:
            continue
        pp = Envelope(slot.pp.sender, slot.pp.body, slot.pp.sig, slot.batch or b"")
        if slot.pp.sender == st.name:
            out.send(peer, pp)
            st.count("retransmitted")
        own = slot.prepares.get(st.name)
        if own is not None:
            out.send(peer, Envelope(own[1].sender, own[1].body, own[1].sig, relay(pp)))
            st.count("retransmitted")
        own = slot.commits.get(st.name)
        if own is not None:
            out.send(peer, Envelope(own[1].sender, own[1].body, own[1].sig))
            st.count("retransmitted")
