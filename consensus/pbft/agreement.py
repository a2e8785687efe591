"""The normal case of PBFT (Castro & Liskov, OSDI'99 §4.2): pre-prepare, prepare, commit.

- A backup accepts PRE-PREPARE(v, n, d) from the primary of v if it is in view
  v, n is within the watermarks, d is the digest of the attached batch,
  every request in it is signed by its client, the batch's time is one it can
  accept (:mod:`consensus.pbft.batch_time`; a refusal is returned to the
  replica, which suspects the primary), and it accepted no other digest
  for (v, n); it logs the pre-prepare and multicasts PREPARE (carrying the
  primary's signed PRE-PREPARE, so an equivocating primary is convicted by the
  backups' relays).
- *Prepared* = the pre-prepare plus 2f matching PREPAREs from other replicas:
  the replica logs the prepared certificate and multicasts COMMIT.
- *Committed-local* = prepared plus 2f+1 matching COMMITs: the sequence number
  is decided and executes in order (:mod:`consensus.pbft.execution`).
"""

from __future__ import annotations

from consensus.pbft import batch_time, execution
from consensus.pbft.messages import (
    Batch,
    Commit,
    Envelope,
    Prepare,
    PreparedCert,
    PrePrepare,
    Request,
    SignatureError,
    Signed,
    digest,
    relay,
    request_ids,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.state import Decided, ReplicaState, Slot
from mesh import wire

__all__ = ["on_preprepare", "accept_preprepare", "on_prepare", "on_commit", "decide",
           "TimeRefused"]


class TimeRefused:
    """A PRE-PREPARE refused for its batch's time (``kind``: see
    :func:`consensus.pbft.batch_time.refusal`)."""

    __slots__ = ("kind", "batch")

    def __init__(self, kind: str, batch: Batch) -> None:
        self.kind = kind
        self.batch = batch


def _batch_ok(st: ReplicaState, data: bytes, peer: str) -> Batch | None:
    """The proposed batch, if every request in it is signed by the client it names."""
    try:
        batch = wire.decode(data, expect=(Batch,))
        for s in batch.requests:
            req = st.verifier.open(s, (Request,))
            assert isinstance(req, Request)
            request_ids(req)
            if req.client != s.sender:
                raise SignatureError("request signed by another DC", "malformed")
    except (wire.WireError, SignatureError):
        st.evidence.count_malformed(peer)
        st.count("bad_batches")
        return None
    return batch


def on_preprepare(st: ReplicaState, out: Outbox, now: float, env: Envelope,
                  pp: PrePrepare) -> TimeRefused | None:
    """A PRE-PREPARE from the primary of ``pp.view`` (the replica checked the sender).
    Returns the refusal when the batch's time is not acceptable; the replica decides
    what follows (it suspects the primary)."""
    if not (st.active and pp.view == st.view and st.in_window(pp.seq)):
        return None
    if pp.seq <= st.last_exec and pp.seq in st.decided:
        return None
    slot = st.slots.get(pp.seq)
    if slot is not None and slot.pp is not None:
        return None  # duplicate, or a conflict already kept as evidence
    data = env.attachment or st.batches.get(pp.digest)
    if data is None or digest(data) != pp.digest:
        return None
    batch = _batch_ok(st, data, env.sender)
    if batch is None:
        return None
    kind = batch_time.refusal(st, now, pp.seq, batch.time_us)
    if kind is not None:
        return TimeRefused(kind, batch)
    st.decoded[pp.digest] = batch  # execution need not decode it again
    accept_preprepare(st, out, now, env, pp, data)
    return None


def accept_preprepare(st: ReplicaState, out: Outbox, now: float, env: Envelope,
                      pp: PrePrepare, data: bytes | None, in_new_view: bool = False) -> None:
    """Log the pre-prepare (durably, before our PREPARE goes out; as the primary, before
    it goes out itself) and vote. ``in_new_view``: it came in the NEW-VIEW this replica
    just logged, which already holds it (and, as primary, sent it)."""
    slot = st.slot(pp.seq)
    slot.pp, slot.digest, slot.batch = env.signed, pp.digest, data
    if data is not None:
        st.batches[pp.digest] = data
        slot.time_us = batch_time.time_of(st, data)
    else:
        execution.fetch(st, out, now, pp.digest)
    if not in_new_view:
        out.persist(st.log.preprepare(pp.seq, env.signed, data))
    if env.sender == st.name:
        if not in_new_view:
            out.broadcast(env)
    else:
        vote = out.sign(Prepare(pp.view, pp.seq, pp.digest), relay(env))
        out.broadcast(vote)
        slot.prepares[st.name] = (pp.digest, vote.signed)
    _check_prepared(st, out, now, slot)


def on_prepare(st: ReplicaState, out: Outbox, now: float, env: Envelope, p: Prepare) -> None:
    if not (st.active and p.view == st.view and st.in_window(p.seq)):
        return
    if env.sender == st.q.primary(p.view):
        return
    slot = st.slot(p.seq)
    if env.sender not in slot.prepares:
        slot.prepares[env.sender] = (p.digest, env.signed)
        _check_prepared(st, out, now, slot)


def on_commit(st: ReplicaState, out: Outbox, now: float, signed: Signed, c: Commit) -> None:
    if not (st.active and c.view == st.view and st.in_window(c.seq)):
        return
    slot = st.slot(c.seq)
    if signed.sender not in slot.commits:
        slot.commits[signed.sender] = (c.digest, signed)
        _check_committed(st, out, now, slot)


def _check_prepared(st: ReplicaState, out: Outbox, now: float, slot: Slot) -> None:
    if slot.pp is None or slot.prepared:
        return
    good = [s for d, s in slot.prepares.values() if d == slot.digest]
    if len(good) < 2 * st.q.f:
        return
    slot.prepared = True
    cert = PreparedCert(slot.pp, tuple(good[: 2 * st.q.f]))
    st.prepared_certs[slot.seq] = (st.view, cert)
    out.persist(st.log.prepared(slot.seq, cert, slot.batch))  # P, before our COMMIT goes out
    assert slot.digest is not None
    vote = out.sign(Commit(st.view, slot.seq, slot.digest))
    out.broadcast(vote)
    slot.sent_commit = True
    slot.commits[st.name] = (slot.digest, vote.signed)
    _check_committed(st, out, now, slot)


def _check_committed(st: ReplicaState, out: Outbox, now: float, slot: Slot) -> None:
    if not slot.prepared or slot.seq in st.decided:
        return
    good = tuple(s for d, s in slot.commits.values() if d == slot.digest)
    if len(good) < 2 * st.q.f + 1:
        return
    assert slot.digest is not None and slot.pp is not None
    decide(st, out, now, slot.seq, slot.digest, good[: 2 * st.q.f + 1], slot.batch)


def decide(st: ReplicaState, out: Outbox, now: float, seq: int, dig: bytes,
           commits: tuple[Signed, ...], batch: bytes | None) -> None:
    """``seq`` committed with ``dig`` (proven by ``commits``): log it and execute what is
    next in order."""
    st.decided[seq] = Decided(dig, commits, batch)
    # Not synced (consensus.pbft.durable): a decision lost in a crash comes back from the
    # peers, and the prepared certificate logged before our COMMIT keeps it safe.
    if st.log.fits(seq):
        out.persist(st.log.committed(seq, commits, batch))
    if batch is None:
        execution.fetch(st, out, now, dig)
    execution.execute_ready(st, out, now)
