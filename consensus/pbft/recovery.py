"""Crash recovery of the PBFT replica: rebuild from the durable log (TOCS'02 §4.3).

On start-up the replica reads what survived (:meth:`consensus.durable.ReplicaLog.load`)
and rebuilds: the view, the stable checkpoint's snapshot, the pre-prepares it
accepted in its current view, the prepared certificates it holds, and every
logged decision above the checkpoint, executed again in order. Replies and
checkpoints the replay makes were sent before the crash and are not sent again.
"""

from __future__ import annotations

from consensus.ledger import Ledger
from consensus.pbft import execution
from consensus.pbft.messages import Commit, PreparedCert, PrePrepare, digest
from consensus.pbft.outbox import Outbox
from consensus.pbft.state import Decided, ReplicaState

__all__ = ["recover"]


def recover(st: ReplicaState, out: Outbox) -> None:
    """Rebuild ``st`` from its durable log."""
    rec = st.log.load()
    st.view, st.active = rec.view.view, rec.view.active
    if rec.checkpoint is not None:
        ck = rec.checkpoint
        st.ledger = Ledger.restore(st.q.members, ck.snapshot)
        st.low = st.last_exec = ck.seq
        st.stable_proof, st.stable_snapshot = ck.proof, ck.snapshot
    for slot in rec.slots:
        if slot.seq <= st.low:
            continue
        data = slot.batch if slot.preprepare is not None or slot.commits else None
        if data is not None and data:
            st.batches[digest(data)] = data
        if slot.prepares and slot.preprepare is not None:
            pp = st.verifier.open(slot.preprepare, (PrePrepare,))
            assert isinstance(pp, PrePrepare)
            cert = PreparedCert(slot.preprepare, slot.prepares)
            st.prepared_certs[slot.seq] = (pp.view, cert)
        if slot.preprepare is not None:
            pp = st.verifier.open(slot.preprepare, (PrePrepare,))
            assert isinstance(pp, PrePrepare)
            if pp.view == st.view and st.active:
                # never accept (or, as primary, propose) another digest here
                restored = st.slot(slot.seq)
                restored.pp, restored.digest = slot.preprepare, pp.digest
                restored.batch = data or None
                if slot.preprepare.sender == st.name:
                    st.next_seq = max(st.next_seq, slot.seq + 1)
        if slot.commits:
            c = st.verifier.open(slot.commits[0], (Commit,))
            assert isinstance(c, Commit)
            st.decided[slot.seq] = Decided(c.digest, slot.commits, data or None)
    st.next_seq = max(st.next_seq, st.low + 1, max(st.decided, default=0) + 1)
    while st.last_exec + 1 in st.decided:
        seq = st.last_exec + 1
        data = st.decided[seq].batch
        if data is None:
            break
        execution.execute(st, out, 0.0, seq, data)
    out.discard()  # replies and checkpoints of the replay were sent before the crash
