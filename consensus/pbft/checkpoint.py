"""Checkpoints of the PBFT replica (Castro & Liskov, OSDI'99 §4.3; TOCS'02 §6.2).

- A replica signs CHECKPOINT(n, state digest) after executing n with n mod K = 0
  (:func:`consensus.pbft.execution.execute`). 2f+1 matching ones make the
  checkpoint *stable*: :func:`make_stable` moves the low watermark to n, logs
  the snapshot with its proof, and discards the log, batches and evidence at or
  below n.
- When 2f+1 replicas prove a checkpoint this replica has not reached (or
  reached with a different state: a divergence), it asks a peer for the state
  (:func:`request_state`; the answer is handled by :mod:`consensus.pbft.transfer`).
"""

from __future__ import annotations

from consensus.pbft.durable import CheckpointRecord
from consensus.pbft.messages import (
    NULL_DIGEST,
    Checkpoint,
    PreparedCert,
    PrePrepare,
    Signed,
    SnapshotFetch,
    StateRequest,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.quorum import check_checkpoint_proof
from consensus.pbft.state import ReplicaState
from mesh import wire

__all__ = ["on_checkpoint", "make_stable", "check_stable_proof", "request_state"]


def on_checkpoint(st: ReplicaState, out: Outbox, now: float, signed: Signed,
                  c: Checkpoint) -> None:
    """A CHECKPOINT vote (ours included); 2f+1 matching make the checkpoint stable."""
    if c.seq % st.cfg.checkpoint_interval or not st.in_window(c.seq):
        return
    votes = st.checkpoint_votes.setdefault(c.seq, {})
    votes.setdefault(signed.sender, (c.state_digest, signed))
    matching = [s for d, s in votes.values() if d == c.state_digest]
    if len(matching) < 2 * st.q.f + 1:
        return
    own = st.snapshots.get(c.seq)
    if own is not None and own[1] == c.state_digest:
        make_stable(st, out, c.seq, own[0], tuple(matching[: 2 * st.q.f + 1]))
    elif st.last_exec < c.seq:
        request_state(st, out, now)
    else:
        st.count("checkpoint_divergence")
        out.notify("pbft.divergence", {"seq": c.seq})
        request_state(st, out, now)


def _cert_digest(cert: PreparedCert) -> bytes:
    body = wire.decode(cert.preprepare.body, expect=(PrePrepare,))
    assert isinstance(body, PrePrepare)
    return body.digest


def make_stable(st: ReplicaState, out: Outbox, seq: int, snapshot: bytes,
                proof: tuple[Signed, ...], hashes: tuple[bytes, ...] | None = None) -> None:
    """Move the low watermark to ``seq`` and discard the log at or below it. ``hashes``:
    the snapshot's chunk hashes, if known (a snapshot fetched in chunks)."""
    if seq <= st.low:
        return
    st.prev_stable = (st.low, st.stable_snapshot)
    st.low, st.stable_proof, st.stable_snapshot = seq, proof, snapshot
    if hashes is not None:
        st.stable_hashes = (seq, hashes)
    for write in st.log.checkpoint(CheckpointRecord(seq, snapshot, proof), hashes):
        out.persist(write)
    st.count("stable_checkpoints")
    for d in (st.slots, st.decided, st.prepared_certs, st.checkpoint_votes):
        for k in [k for k in d if k <= seq]:
            del d[k]
    st.snapshots = {k: v for k, v in st.snapshots.items() if k > seq}
    live = {NULL_DIGEST} | {s.digest for s in st.slots.values() if s.digest}
    live |= {d.digest for d in st.decided.values()}
    live |= {_cert_digest(c) for _, c in st.prepared_certs.values()}
    st.batches = {d: b for d, b in st.batches.items() if d in live}
    st.decoded = {d: b for d, b in st.decoded.items() if d in live}
    st.evidence.forget_through(seq)
    st.next_seq = max(st.next_seq, seq + 1)


def check_stable_proof(st: ReplicaState, seq: int, proof: tuple[Signed, ...]) -> bytes:
    """The state digest 2f+1 replicas signed for checkpoint ``seq`` (raises
    :class:`~consensus.pbft.quorum.CertificateError`)."""
    return check_checkpoint_proof(st.verifier, st.q, seq, proof, st.genesis)


def request_state(st: ReplicaState, out: Outbox, now: float) -> None:
    """Ask one peer for what we miss: a random one among those whose last STATUS
    claimed to be ahead (so a faulty peer that always claims to be ahead is not
    always the one asked), or any peer if none did."""
    if now < st.transfer_until or st.restoring is not None:
        return  # (a restore running: what follows it is asked for when it is in)
    st.transfer_until = now + 2 * st.cfg.status_interval
    ahead = sorted(p for p, seq in st.ahead.items() if seq > st.last_exec)
    target = st.rng.choice(ahead or st.others())
    st.count("state_requests")
    out.send(target, out.sign(StateRequest(st.last_exec)))
    t = st.chunked
    if t is not None and t.seq > st.last_exec:
        # a chunked snapshot half fetched: go on from this peer at the first chunk we miss
        # (if it moved to a later checkpoint, its answer to the request says so)
        index = t.chunks.missing()
        if index is not None:
            t.source = target
            out.send(target, out.sign(SnapshotFetch(t.seq, index)))
