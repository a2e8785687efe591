"""Execution and batch fetching of the PBFT replica.

- Batches execute strictly in sequence order (OSDI'99 §4.2); each request of a
  batch is checked again (signed by the client it names), each of its commands
  applied exactly once by the ledger under its own request id at the batch's
  time (:mod:`consensus.pbft.batch_time`), and answered
  with one signed REPLY per client and batch.
- After seq n with n mod K = 0 the replica signs CHECKPOINT(n, state digest)
  and counts it as its own vote (:mod:`consensus.pbft.checkpoint`).
- A replica that must execute a digest whose batch it never received (it came
  in a NEW-VIEW) fetches it from its peers and checks it against the digest.
"""

from __future__ import annotations

import attrs

from consensus.pbft import batch_time, checkpoint
from consensus.pbft.messages import (
    NULL_DIGEST,
    Batch,
    BatchData,
    Checkpoint,
    Envelope,
    FetchBatch,
    Reply,
    Request,
    Result,
    SignatureError,
    digest,
    request_ids,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.state import ReplicaState
from consensus.snapshot_chunks import snapshot_digest
from mesh import wire

__all__ = [
    "execute_ready",
    "execute",
    "fetch",
    "retry_fetches",
    "on_fetch_batch",
    "on_batch_data",
]


# --------------------------------------------------------------------------- execution

def execute_ready(st: ReplicaState, out: Outbox, now: float) -> None:
    """Execute every decided batch that is next in order and held here. When one did,
    ``st.progressed`` is set: the replica then re-arms its request timer and proposes
    again (:meth:`consensus.pbft.replica.Replica.handle`)."""
    progressed = False
    while True:
        seq = st.last_exec + 1
        dec = st.decided.get(seq)
        if dec is None:
            break
        data = dec.batch if dec.batch is not None else st.batches.get(dec.digest)
        if data is None:
            break
        if dec.batch is None:
            st.decided[seq] = attrs.evolve(dec, batch=data)
        execute(st, out, now, seq, data)
        progressed = True
    if progressed:
        st.progress_at = now
        st.backoff = 0
        st.progressed = True


def execute(st: ReplicaState, out: Outbox, now: float, seq: int, data: bytes,
            replay: bool = False) -> None:
    """Apply batch ``seq`` to the ledger and answer its clients. ``replay``: the replica
    rebuilds after a restart; it sends no replies (they went out before the crash, or
    the client asks again and gets the remembered results), and still reports the
    execution and signs its checkpoint."""
    dig = digest(data)  # once: the decoded cache's key and the notification's digest
    batch = st.decoded.pop(dig, None)
    if batch is None:
        try:
            batch = wire.decode(data, expect=(Batch,))
        except wire.WireError:
            batch = Batch(())  # a digest 2f+1 replicas agreed on; unreadable means null
    requests = batch.requests
    # Ledger time: the batch's stamp, the same at every replica (consensus.pbft.batch_time).
    at = batch.time_us / batch_time.US
    executed: list[tuple[str, int]] = []
    replies: dict[str, list[Result]] = {}
    for s in requests:
        try:
            req = st.verifier.open(s, (Request,))
            assert isinstance(req, Request)
            ids = request_ids(req)
        except SignatureError:
            continue
        if req.client != s.sender:
            continue
        results = replies.setdefault(req.client, [])
        for rid, command in zip(ids, req.commands, strict=True):
            result, fresh = st.ledger.execute_once(req.client, rid, command, at)
            if fresh:  # executed now, not a duplicate answered from the exactly-once window
                executed.append((req.client, rid))
            results.append(Result(rid, result))
        key = (req.client, req.request_id)
        st.drop_pending(key)
        st.proposed.pop(key, None)
    for client, results in ({} if replay else replies).items():
        reply = Reply(st.view, client, tuple(results))
        if client == st.name:
            out.extend(st.client.on_reply(now, st.name, reply))
        else:
            out.send(client, out.sign(reply))
    st.last_exec = seq
    st.count("executed_batches")
    out.notify("pbft.executed", {"seq": seq, "digest": dig, "requests": executed})
    if seq % st.cfg.checkpoint_interval == 0:
        # the snapshot is the whole ledger (megabytes at tens of thousands of VMs): hashed
        # once, its digest kept with it, signed and counted as this replica's own vote
        snap = st.ledger.snapshot()
        own = Checkpoint(seq, snapshot_digest(snap))
        st.snapshots[seq] = (snap, own.state_digest)
        env = out.sign(own)
        out.broadcast(env)
        checkpoint.on_checkpoint(st, out, now, env.signed, own)


# --------------------------------------------------------------------------- batches

def fetch(st: ReplicaState, out: Outbox, now: float, dig: bytes) -> None:
    if dig in st.batches or dig in st.fetching:
        return
    st.fetching[dig] = now
    out.broadcast(out.sign(FetchBatch(dig)))


def retry_fetches(st: ReplicaState, out: Outbox) -> None:
    for dig in list(st.fetching):
        if dig in st.batches:
            del st.fetching[dig]
        else:
            out.broadcast(out.sign(FetchBatch(dig)))


def on_fetch_batch(st: ReplicaState, out: Outbox, peer: str, fb: FetchBatch) -> None:
    data = st.batches.get(fb.digest)
    if data is not None and fb.digest != NULL_DIGEST:
        out.send(peer, out.sign(BatchData(fb.digest), data))


def on_batch_data(st: ReplicaState, out: Outbox, now: float, env: Envelope,
                  bd: BatchData) -> None:
    if bd.digest not in st.fetching or digest(env.attachment) != bd.digest:
        return
    del st.fetching[bd.digest]
    st.batches[bd.digest] = env.attachment
    for slot in st.slots.values():
        if slot.digest == bd.digest and slot.batch is None:
            slot.batch = env.attachment
            slot.time_us = batch_time.time_of(st, env.attachment)
    execute_ready(st, out, now)
