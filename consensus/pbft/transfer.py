"""State transfer for a lagging or restarted replica (TOCS'02 §5.2, §6.2).

A replica that learns it is behind (a peer's STATUS, a stable checkpoint it
has not reached, a NEW-VIEW that starts above it) sends STATE-REQUEST
(:func:`consensus.pbft.checkpoint.request_state`). The answer is a STATE-REPLY
whose attachment holds, if the requester is below the stable checkpoint, the
ledger snapshot — proven by the 2f+1 signed CHECKPOINTs of that checkpoint,
which the requester checks against the snapshot's digest — and then
committed entries, each proven by 2f+1 matching signed COMMITs and checked
against its batch digest. Nothing in a reply is trusted because of who sent it.
"""

from __future__ import annotations

from consensus.ledger import Ledger, LedgerInvariantError
from consensus.pbft import agreement, checkpoint, execution
from consensus.pbft.messages import (
    MAX_PREPARED,
    CatchUp,
    CommittedEntry,
    Envelope,
    StateReply,
    StateRequest,
    digest,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.quorum import CertificateError, check_commit_cert
from consensus.pbft.state import ReplicaState
from mesh import wire

__all__ = ["rate_ok", "on_state_request", "on_state_reply"]


def rate_ok(st: ReplicaState, now: float, key: str) -> bool:
    """At most one answer per peer and kind per status interval (a faulty peer's
    flood of STATUS or STATE-REQUEST must not turn us into an amplifier)."""
    last = st.served.get(key)
    if last is not None and now - last < st.cfg.status_interval:
        return False
    st.served[key] = now
    return True


def on_state_request(st: ReplicaState, out: Outbox, now: float, peer: str,
                     sr: StateRequest) -> None:
    if sr.last_executed >= st.last_exec or not rate_ok(st, now, "state/" + peer):
        return
    snapshot = None
    start = sr.last_executed
    if sr.last_executed < st.low:
        snapshot, start = st.stable_snapshot, st.low
    entries: list[CommittedEntry] = []
    for seq in range(start + 1, st.last_exec + 1):
        dec = st.decided.get(seq)
        if dec is None or dec.batch is None or len(entries) >= 2 * MAX_PREPARED:
            break
        entries.append(CommittedEntry(seq, dec.commits, dec.batch))
    if snapshot is None and not entries:
        return
    att = wire.encode(CatchUp(snapshot, tuple(entries)))
    body = StateReply(st.low, st.stable_proof, digest(att))
    out.send(peer, out.sign(body, att))


def on_state_reply(st: ReplicaState, out: Outbox, now: float, env: Envelope,
                   sr: StateReply) -> None:
    st.transfer_until = 0.0
    # what state transfer costs on the wire (dwcp bench fleet reads it)
    st.count("state_transfer_bytes", len(env.attachment))
    try:
        if digest(env.attachment) != sr.attachment_digest:
            raise wire.WireError("attachment does not match its digest")
        cu = wire.decode(env.attachment, expect=(CatchUp,))
    except wire.WireError:
        st.evidence.count_malformed(env.sender)
        return
    if cu.snapshot is not None and sr.checkpoint_seq > st.last_exec:
        try:
            state_digest = checkpoint.check_stable_proof(st, sr.checkpoint_seq,
                                                         sr.checkpoint_proof)
            if digest(cu.snapshot) != state_digest:
                raise CertificateError("snapshot does not match the proven digest")
            ledger = Ledger.restore(st.q.members, cu.snapshot, st.operators)
        except (CertificateError, wire.WireError, LedgerInvariantError):
            st.evidence.count_malformed(env.sender)
            st.count("bad_state_replies")
            return
        st.ledger = ledger
        st.last_exec = sr.checkpoint_seq
        st.count("state_transfers")
        # Reported before the checkpoint is logged: a crash right after that write
        # restarts the replica from it, and whoever follows its executions must know.
        out.notify("pbft.state-transfer", {"seq": sr.checkpoint_seq})
        checkpoint.make_stable(st, out, sr.checkpoint_seq, cu.snapshot, sr.checkpoint_proof)
        for key in [k for k in st.pending if ledger.executed_result(*k) is not None]:
            st.drop_pending(key)
    for e in cu.entries:
        if e.seq <= st.last_exec:
            continue
        if e.seq != st.last_exec + 1:
            break
        try:
            d = check_commit_cert(st.verifier, st.q, e.seq, e.commits)
        except CertificateError:
            st.evidence.count_malformed(env.sender)
            break
        if digest(e.batch) != d:
            st.evidence.count_malformed(env.sender)
            break
        st.batches[d] = e.batch
        agreement.decide(st, out, now, e.seq, d, e.commits, e.batch)
    execution.execute_ready(st, out, now)
