"""Retransmission and state transfer for a lagging or restarted replica (TOCS'02 §5.2, §6.2).

Every replica multicasts a signed STATUS (view, active, last executed, stable
checkpoint) every ``status_interval``. A peer that learns from it that the
sender is behind helps:

- a sender in an older view (or still changing view) gets the NEW-VIEW that
  brought this replica into its view, or this replica's own VIEW-CHANGE;
- a sender in the same view at the same height gets this replica's messages
  for the sequence numbers still in progress (lost PRE-PREPAREs, PREPAREs,
  COMMITs are repaired without a view change);
- a replica that sees a peer ahead of it sends STATE-REQUEST.

The answer to STATE-REQUEST is a STATE-REPLY whose attachment holds, if the
requester is below the stable checkpoint, the ledger snapshot — proven by the
2f+1 signed CHECKPOINTs of that checkpoint, which the requester checks
against the snapshot's digest — and then committed entries, each proven by
2f+1 matching signed COMMITs and checked against its batch digest. Nothing in
a reply is trusted because of who sent it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consensus.ledger import Ledger, LedgerInvariantError
from consensus.pbft import execution, viewchange
from consensus.pbft.messages import (
    MAX_PREPARED,
    CatchUp,
    CommittedEntry,
    Envelope,
    StateReply,
    StateRequest,
    Status,
    digest,
)
from consensus.pbft.quorum import CertificateError, check_commit_cert
from mesh import wire
from mesh.core import Notify

if TYPE_CHECKING:
    from consensus.pbft.replica import Replica

__all__ = ["on_status", "request_state", "on_state_request", "on_state_reply"]


def _rate_ok(r: Replica, now: float, key: str) -> bool:
    """At most one answer per peer and kind per status interval (a faulty peer's
    flood of STATUS or STATE-REQUEST must not turn us into an amplifier)."""
    last = r.served.get(key)
    if last is not None and now - last < r.cfg.status_interval:
        return False
    r.served[key] = now
    return True

def on_status(r: Replica, now: float, peer: str, st: Status) -> None:
    r.ahead[peer] = max(st.last_executed, st.stable_seq)
    if r.ahead[peer] > r.last_exec:
        request_state(r, now)
    if not _rate_ok(r, now, "status/" + peer):
        return
    behind = st.view < r.view or (st.view == r.view and not st.active)
    if behind or st.last_executed < r.last_exec or st.view > r.view:
        r._send(peer, r._status())  # let it see how far ahead we are
    if behind:
        if r.active and r.new_view_msg is not None:
            r._send(peer, r.new_view_msg)
        elif not r.active:
            viewchange.resend_view_change(r, peer)
    elif st.view == r.view and st.active and r.active:
        if st.last_executed == r.last_exec:
            _retransmit_slots(r, peer)

def _retransmit_slots(r: Replica, peer: str) -> None:
    from consensus.pbft.replica import relay

    for seq in sorted(r.slots):
        slot = r.slots[seq]
        if seq <= r.last_exec or slot.pp is None:
            continue
        pp = Envelope(slot.pp.sender, slot.pp.body, slot.pp.sig, slot.batch or b"")
        if slot.pp.sender == r.name:
            r._send(peer, pp)
        own = slot.prepares.get(r.name)
        if own is not None:
            r._send(peer, Envelope(own[1].sender, own[1].body, own[1].sig, relay(pp)))
        own = slot.commits.get(r.name)
        if own is not None:
            r._send(peer, Envelope(own[1].sender, own[1].body, own[1].sig))

def request_state(r: Replica, now: float) -> None:
    """Ask one peer for what we miss: a random one among those whose last STATUS
    claimed to be ahead (so a faulty peer that always claims to be ahead is not
    always the one asked), or any peer if none did."""
    if now < r.transfer_until:
        return
    r.transfer_until = now + 2 * r.cfg.status_interval
    ahead = sorted(p for p, seq in r.ahead.items() if seq > r.last_exec)
    target = r.rng.choice(ahead or r._others())
    r._count("state_requests")
    r._send(target, r._sign(StateRequest(r.last_exec)))

def on_state_request(r: Replica, now: float, peer: str, sr: StateRequest) -> None:
    if sr.last_executed >= r.last_exec or not _rate_ok(r, now, "state/" + peer):
        return
    snapshot = None
    start = sr.last_executed
    if sr.last_executed < r.low:
        snapshot, start = r.stable_snapshot, r.low
    entries: list[CommittedEntry] = []
    for seq in range(start + 1, r.last_exec + 1):
        dec = r.decided.get(seq)
        if dec is None or dec.batch is None or len(entries) >= 2 * MAX_PREPARED:
            break
        entries.append(CommittedEntry(seq, dec.commits, dec.batch))
    if snapshot is None and not entries:
        return
    att = wire.encode(CatchUp(snapshot, tuple(entries)))
    body = StateReply(r.low, r.stable_proof, digest(att))
    r._send(peer, r._sign(body, att))

def on_state_reply(r: Replica, now: float, env: Envelope, sr: StateReply) -> None:
    r.transfer_until = 0.0
    try:
        if digest(env.attachment) != sr.attachment_digest:
            raise wire.WireError("attachment does not match its digest")
        cu = wire.decode(env.attachment, expect=(CatchUp,))
    except wire.WireError:
        r.evidence.count_malformed(env.sender)
        return
    if cu.snapshot is not None and sr.checkpoint_seq > r.last_exec:
        try:
            state_digest = execution.check_stable_proof(r, sr.checkpoint_seq, sr.checkpoint_proof)
            if digest(cu.snapshot) != state_digest:
                raise CertificateError("snapshot does not match the proven digest")
            ledger = Ledger.restore(r.q.members, cu.snapshot, r.operators)
        except (CertificateError, wire.WireError, LedgerInvariantError):
            r.evidence.count_malformed(env.sender)
            r._count("bad_state_replies")
            return
        r.ledger = ledger
        r.last_exec = sr.checkpoint_seq
        execution.make_stable(r, sr.checkpoint_seq, cu.snapshot, sr.checkpoint_proof)
        for key in [k for k in r.pending if ledger.executed_result(*k) is not None]:
            r._drop_pending(key)
        r._count("state_transfers")
        r._emit(Notify("pbft.state-transfer", {"seq": sr.checkpoint_seq}))
    for e in cu.entries:
        if e.seq <= r.last_exec:
            continue
        if e.seq != r.last_exec + 1:
            break
        try:
            d = check_commit_cert(r.verifier, r.q, e.seq, e.commits)
        except CertificateError:
            r.evidence.count_malformed(env.sender)
            break
        if digest(e.batch) != d:
            r.evidence.count_malformed(env.sender)
            break
        r.batches[d] = e.batch
        r._decide(now, e.seq, d, e.commits, e.batch, None)
    execution.execute_ready(r, now)
