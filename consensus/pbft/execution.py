"""Execution, checkpoints, batch fetching and crash recovery of the PBFT replica.

- Batches execute strictly in sequence order (OSDI'99 §4.2); each request of a
  batch is checked again (signed by the client it names), each of its commands
  applied exactly once by the ledger under its own request id, and answered
  with one signed REPLY per client and batch.
- After seq n with n mod K = 0 the replica signs CHECKPOINT(n, state digest);
  2f+1 matching ones make it stable: the low watermark moves to n and the log,
  batches and evidence at or below it are discarded (§4.3).
- A replica that must execute a digest whose batch it never received (it came
  in a NEW-VIEW) fetches it from its peers and checks it against the digest.
- On start-up the replica rebuilds from its durable log (TOCS'02 §4.3): the
  stable checkpoint's snapshot, then every logged decision above it, in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from consensus.durable import CheckpointRecord, ReplicaLog
from consensus.ledger import Ledger
from consensus.pbft import transfer
from consensus.pbft.messages import (
    NULL_DIGEST,
    Batch,
    BatchData,
    Checkpoint,
    Commit,
    Envelope,
    FetchBatch,
    PreparedCert,
    PrePrepare,
    Reply,
    Request,
    Result,
    SignatureError,
    Signed,
    digest,
    request_ids,
)
from consensus.pbft.quorum import check_checkpoint_proof
from mesh import wire
from mesh.core import Notify

if TYPE_CHECKING:
    from consensus.pbft.replica import Replica

__all__ = [
    "Decided",
    "execute_ready",
    "on_checkpoint",
    "make_stable",
    "check_stable_proof",
    "fetch",
    "retry_fetches",
    "on_fetch_batch",
    "on_batch_data",
    "recover",
]


@attrs.frozen
class Decided:
    """A committed sequence number: its digest, commit certificate and batch (if held)."""

    digest: bytes
    commits: tuple[Signed, ...]
    batch: bytes | None


def _cert_digest(cert: PreparedCert) -> bytes:
    body = wire.decode(cert.preprepare.body, expect=(PrePrepare,))
    assert isinstance(body, PrePrepare)
    return body.digest


# --------------------------------------------------------------------------- execution

def execute_ready(r: Replica, now: float) -> None:
    progressed = False
    while True:
        seq = r.last_exec + 1
        dec = r.decided.get(seq)
        if dec is None:
            break
        data = dec.batch if dec.batch is not None else r.batches.get(dec.digest)
        if data is None:
            break
        if dec.batch is None:
            r.decided[seq] = attrs.evolve(dec, batch=data)
        execute(r, now, seq, data)
        progressed = True
    if progressed:
        r.progress_at = now
        r.backoff = 0
        r._arm_request_timer(now, restart=True)
        r._maybe_propose(now)

def execute(r: Replica, now: float, seq: int, data: bytes) -> None:
    requests = r.decoded.pop(digest(data), None)
    if requests is None:
        try:
            requests = wire.decode(data, expect=(Batch,)).requests
        except wire.WireError:
            requests = ()  # a digest 2f+1 replicas agreed on; unreadable means null
    executed: list[tuple[str, int]] = []
    replies: dict[str, list[Result]] = {}
    for s in requests:
        try:
            req = r.verifier.open(s, (Request,))
            assert isinstance(req, Request)
            ids = request_ids(req)
        except SignatureError:
            continue
        if req.client != s.sender:
            continue
        results = replies.setdefault(req.client, [])
        for rid, command in zip(ids, req.commands, strict=True):
            if r.ledger.executed_result(req.client, rid) is None:
                executed.append((req.client, rid))
            results.append(Result(rid, r.ledger.execute(req.client, rid, command)))
        key = (req.client, req.request_id)
        r._drop_pending(key)
        r.proposed.pop(key, None)
    for client, results in replies.items():
        reply = Reply(r.view, client, tuple(results))
        if client == r.name:
            r._emit(*r.client.on_reply(now, r.name, reply))
        else:
            r._send(client, r._sign(reply))
    r.last_exec = seq
    r._count("executed_batches")
    r._emit(
        Notify("pbft.executed", {"seq": seq, "digest": digest(data), "requests": executed})
    )
    if seq % r.cfg.checkpoint_interval == 0:
        snap = r.ledger.snapshot()
        r.snapshots[seq] = (snap, digest(snap))
        env = r._sign(Checkpoint(seq, digest(snap)))
        r._broadcast(env)
        on_checkpoint(r, now, env.signed, Checkpoint(seq, digest(snap)))

# --------------------------------------------------------------------------- checkpoints

def on_checkpoint(r: Replica, now: float, signed: Signed, c: Checkpoint) -> None:
    if c.seq % r.cfg.checkpoint_interval or not r._in_window(c.seq):
        return
    r._observe(now, signed, c)
    votes = r.checkpoint_votes.setdefault(c.seq, {})
    votes.setdefault(signed.sender, (c.state_digest, signed))
    matching = [s for d, s in votes.values() if d == c.state_digest]
    if len(matching) < 2 * r.q.f + 1:
        return
    own = r.snapshots.get(c.seq)
    if own is not None and own[1] == c.state_digest:
        make_stable(r, c.seq, own[0], tuple(matching[: 2 * r.q.f + 1]))
    elif r.last_exec < c.seq:
        transfer.request_state(r, now)
    else:
        r._count("checkpoint_divergence")
        r._emit(Notify("pbft.divergence", {"seq": c.seq}))
        transfer.request_state(r, now)

def make_stable(r: Replica, seq: int, snapshot: bytes, proof: tuple[Signed, ...]) -> None:
    """Move the low watermark to ``seq`` and discard the log at or below it."""

    if seq <= r.low:
        return
    r.low, r.stable_proof, r.stable_snapshot = seq, proof, snapshot
    r._emit(ReplicaLog.checkpoint_action(CheckpointRecord(seq, snapshot, proof)))
    r._count("stable_checkpoints")
    for d in (r.slots, r.decided, r.prepared_certs, r.checkpoint_votes):
        for k in [k for k in d if k <= seq]:
            del d[k]
    r.snapshots = {k: v for k, v in r.snapshots.items() if k > seq}
    live = {NULL_DIGEST} | {s.digest for s in r.slots.values() if s.digest}
    live |= {d.digest for d in r.decided.values()}
    live |= {_cert_digest(c) for _, c in r.prepared_certs.values()}
    r.batches = {d: b for d, b in r.batches.items() if d in live}
    r.decoded = {d: b for d, b in r.decoded.items() if d in live}
    r.evidence.forget_through(seq)
    r.next_seq = max(r.next_seq, seq + 1)

def check_stable_proof(r: Replica, seq: int, proof: tuple[Signed, ...]) -> bytes:
    return check_checkpoint_proof(r.verifier, r.q, seq, proof, r.genesis)

# --------------------------------------------------------------------------- batches

def fetch(r: Replica, now: float, dig: bytes) -> None:
    if dig in r.batches or dig in r.fetching:
        return
    r.fetching[dig] = now
    r._broadcast(r._sign(FetchBatch(dig)))

def retry_fetches(r: Replica, now: float) -> None:
    for dig in list(r.fetching):
        if dig in r.batches:
            del r.fetching[dig]
        else:
            r._broadcast(r._sign(FetchBatch(dig)))

def on_fetch_batch(r: Replica, peer: str, fb: FetchBatch) -> None:
    data = r.batches.get(fb.digest)
    if data is not None and fb.digest != NULL_DIGEST:
        r._send(peer, r._sign(BatchData(fb.digest), data))

def on_batch_data(r: Replica, now: float, env: Envelope, bd: BatchData) -> None:
    if bd.digest not in r.fetching or digest(env.attachment) != bd.digest:
        return
    del r.fetching[bd.digest]
    r.batches[bd.digest] = env.attachment
    for slot in r.slots.values():
        if slot.digest == bd.digest and slot.batch is None:
            slot.batch = env.attachment
    execute_ready(r, now)

# --------------------------------------------------------------------------- recovery

def recover(r: Replica) -> None:
    """Rebuild from the durable log after a restart (TOCS'02 §4.3)."""
    rec = r.log.load()
    r.view, r.active = rec.view.view, rec.view.active
    if rec.checkpoint is not None:
        ck = rec.checkpoint
        r.ledger = Ledger.restore(r.q.members, ck.snapshot, r.operators)
        r.low = r.last_exec = ck.seq
        r.stable_proof, r.stable_snapshot = ck.proof, ck.snapshot
    for slot in rec.slots:
        if slot.seq <= r.low:
            continue
        data = slot.batch if slot.preprepare is not None or slot.commits else None
        if data is not None and data:
            r.batches[digest(data)] = data
        if slot.prepares and slot.preprepare is not None:
            pp = r.verifier.open(slot.preprepare, (PrePrepare,))
            assert isinstance(pp, PrePrepare)
            cert = PreparedCert(slot.preprepare, slot.prepares)
            r.prepared_certs[slot.seq] = (pp.view, cert)
        if slot.preprepare is not None:
            pp = r.verifier.open(slot.preprepare, (PrePrepare,))
            assert isinstance(pp, PrePrepare)
            if pp.view == r.view and r.active:
                # never accept (or, as primary, propose) another digest here
                restored = r._slot(slot.seq)
                restored.pp, restored.digest = slot.preprepare, pp.digest
                restored.batch = data or None
                if slot.preprepare.sender == r.name:
                    r.next_seq = max(r.next_seq, slot.seq + 1)
        if slot.commits:
            c = r.verifier.open(slot.commits[0], (Commit,))
            assert isinstance(c, Commit)
            r.decided[slot.seq] = Decided(c.digest, slot.commits, data or None)
    r.next_seq = max(r.next_seq, r.low + 1, max(r.decided, default=0) + 1)
    r._out.clear()
    while r.last_exec + 1 in r.decided:
        seq = r.last_exec + 1
        data = r.decided[seq].batch
        if data is None:
            break
        execute(r, 0.0, seq, data)
    r._out.clear()  # replies and checkpoints of the replay were sent before the crash
