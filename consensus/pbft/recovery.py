"""Crash recovery of the PBFT replica: rebuild from the durable log (TOCS'02 §4.3-4.5).

On start-up the replica reads what survived (:meth:`consensus.pbft.durable.ReplicaLog.load`)
and rebuilds what it must not contradict:

- the view, whether it is active, and the NEW-VIEW that started it (handed to
  any replica still behind, :mod:`consensus.pbft.status`);
- the stable checkpoint: the ledger snapshot, the low watermark and its proof;
- Q, the pre-prepares it accepted in its view: the NEW-VIEW's, then those it
  logged one by one. Each becomes a slot again, so it never accepts another
  digest there (nor, as primary, proposes another batch at that number); its
  own PREPARE is signed again (Ed25519 signatures are deterministic: the same
  bytes it sent before) for retransmission;
- P, the prepared certificates, for every later VIEW-CHANGE; one of the current
  view also marks its slot prepared, with our COMMIT signed again;
- the decisions above the checkpoint, executed again in order, without replies
  (:func:`consensus.pbft.execution.execute`); the executions are reported and the
  checkpoints signed again when the replica starts (some of these batches may
  have been decided but not executed before the crash).
"""

from __future__ import annotations

from consensus.ledger import Ledger
from consensus.pbft import batch_time, execution
from consensus.pbft.durable import Recovered
from consensus.pbft.messages import (
    Commit,
    Envelope,
    NewView,
    Prepare,
    PrePrepare,
    Signed,
    ViewChange,
    digest,
    relay,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.state import Decided, ReplicaState
from consensus.snapshot_chunks import CHUNK
from mesh import wire

__all__ = ["recover"]


def recover(st: ReplicaState, out: Outbox) -> None:
    """Rebuild ``st`` from its durable log."""
    rec = st.log.load()
    st.view, st.active = rec.view.view, rec.view.active
    if rec.checkpoint is not None:
        ck = rec.checkpoint
        st.ledger = Ledger.restore(st.q.members, ck.snapshot, st.operators)
        if len(ck.snapshot) > CHUNK:
            # A fleet's ledger: its snapshot encoder's cache filled now, at start-up, or
            # the first checkpoint encodes every record again in the step that executes
            # it (2 s quiet at 100,000 VMs, 10 s under load: links' keepalives lapse).
            st.ledger.snapshot()
        st.low = st.last_exec = ck.seq
        st.stable_proof, st.stable_snapshot = ck.proof, ck.snapshot
    for batch in [r.batch for r in rec.committed] + [r.batch for r in rec.prepared] + [
            r.batch for r in rec.preprepares]:
        if batch:
            st.batches[digest(batch)] = batch
    if st.active:
        _restore_accepted(st, out, rec)
    for p in rec.prepared:
        pp = _preprepare(st, p.cert.preprepare)
        st.prepared_certs[p.seq] = (pp.view, p.cert)
        slot = st.slots.get(p.seq)
        if st.active and pp.view == st.view and slot is not None and slot.digest == pp.digest:
            slot.prepares.update({s.sender: (pp.digest, s) for s in p.cert.prepares})
            slot.prepared = slot.sent_commit = True
            vote = out.sign(Commit(st.view, p.seq, pp.digest))
            slot.commits[st.name] = (pp.digest, vote.signed)
    for c in rec.committed:
        body = st.verifier.open(c.commits[0], (Commit,))
        assert isinstance(body, Commit)
        st.decided[c.seq] = Decided(body.digest, c.commits, st.batches.get(body.digest))
    st.next_seq = max(st.next_seq, st.low + 1, max(st.decided, default=0) + 1)
    while st.last_exec + 1 in st.decided:
        seq = st.last_exec + 1
        data = st.decided[seq].batch
        if data is None:
            break
        execution.execute(st, out, 0.0, seq, data, replay=True)


def _preprepare(st: ReplicaState, signed: Signed) -> PrePrepare:
    body = st.verifier.open(signed, (PrePrepare,))
    assert isinstance(body, PrePrepare)
    return body


def _restore_accepted(st: ReplicaState, out: Outbox, rec: Recovered) -> None:
    """Q of the current view: the NEW-VIEW's pre-prepares, then the logged ones."""
    nv = rec.new_view
    accepted: list[Signed] = []
    body = None if nv is None else wire.decode(nv.body, expect=(NewView,))
    if nv is not None and isinstance(body, NewView) and body.view == st.view:
        accepted.extend(body.preprepares)
        # The new view numbers on from its checkpoint and its O (viewchange._enter_view).
        stable = max(_stable_seq(s) for s in body.view_changes)
        last = _preprepare(st, body.preprepares[-1]).seq if body.preprepares else 0
        st.new_view_msg = nv
        st.next_seq = max(st.next_seq, stable + 1, last + 1)
    accepted.extend(r.preprepare for r in rec.preprepares)
    for signed in accepted:
        pp = _preprepare(st, signed)
        if pp.view != st.view or not st.in_window(pp.seq):
            continue
        slot = st.slot(pp.seq)
        if slot.pp is not None:
            continue  # the NEW-VIEW's comes first; the log holds no other for this view
        slot.pp, slot.digest, slot.batch = signed, pp.digest, st.batches.get(pp.digest)
        if slot.batch is None:
            st.fetching[pp.digest] = 0.0  # the status timer asks the peers for it
        else:
            slot.time_us = batch_time.time_of(st, slot.batch)
        if signed.sender == st.name:
            st.next_seq = max(st.next_seq, pp.seq + 1)
        else:
            pp_env = Envelope(signed.sender, signed.body, signed.sig)
            vote = out.sign(Prepare(pp.view, pp.seq, pp.digest), relay(pp_env))
            slot.prepares[st.name] = (pp.digest, vote.signed)


def _stable_seq(signed: Signed) -> int:
    body = wire.decode(signed.body, expect=(ViewChange,))
    assert isinstance(body, ViewChange)
    return int(body.stable_seq)
