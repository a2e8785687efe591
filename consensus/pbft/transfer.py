"""State transfer for a lagging or restarted replica (TOCS'02 §5.2, §6.2).

A replica that learns it is behind (a peer's STATUS, a stable checkpoint it
has not reached, a NEW-VIEW that starts above it) sends STATE-REQUEST
(:func:`consensus.pbft.checkpoint.request_state`). The answer is a STATE-REPLY
whose attachment holds, if the requester is below the stable checkpoint, the
ledger snapshot — proven by the 2f+1 signed CHECKPOINTs of that checkpoint,
which the requester checks against the snapshot's digest — and then
committed entries, each proven by 2f+1 matching signed COMMITs and checked
against its batch digest. Nothing in a reply is trusted because of who sent it.

A snapshot larger than one chunk (:mod:`consensus.snapshot_chunks`: 1 MiB, a
ledger of about 7,000 VMs) does not ride in the STATE-REPLY: the answer is a
SNAPSHOT-MANIFEST (its size and its chunks' hashes, which hash to the proven
state digest), and the requester fetches the chunks one at a time
(SNAPSHOT-FETCH, SNAPSHOT-CHUNK), each checked against its hash as it arrives;
a transfer cut anywhere resumes at its first missing chunk, from whichever peer
the next STATE-REQUEST goes to (:func:`consensus.pbft.checkpoint.request_state`).
Once the snapshot is installed, a STATE-REQUEST fetches the entries after it.

Rebuilding the ledger from a proven snapshot (decode, invariants) takes seconds for a
fleet (100,000 VMs: 16 MB, 2-3 s on a quiet 2-core machine, 16 s under load). With
``PbftConfig.offload_restore`` the replica does not do it in its step: it hands the
driver an :class:`~mesh.core.Offload` of :func:`restore_ledger` (a pure function of
the snapshot) and goes on handling events; the :class:`~mesh.core.Offloaded` outcome
installs the ledger in one step (:func:`on_restored`), unless the replica got there
another way meanwhile. Nothing is persisted before the install, whose writes are
those of an inline one (:func:`consensus.pbft.checkpoint.make_stable`): a crash while
the work runs leaves the old checkpoint, a crash after the install's writes the new
one. While a restore runs the replica asks no peer for state (the answer would be the
snapshot it is rebuilding); it asks for what follows once the outcome is in.
A peer serves at most :data:`CHUNKS_PER_INTERVAL` chunks to one requester per
status interval, of its stable checkpoint or the one before (a requester half way
through when the checkpoint moved on finishes; one further behind starts again from
the manifest of the new one).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from consensus import snapshot_chunks
from consensus.authz import OperatorTable
from consensus.ledger import Ledger, LedgerInvariantError
from consensus.pbft import agreement, checkpoint, execution
from consensus.pbft.messages import (
    MAX_PREPARED,
    CatchUp,
    CommittedEntry,
    Envelope,
    Signed,
    SnapshotChunk,
    SnapshotFetch,
    SnapshotManifest,
    StateReply,
    StateRequest,
    digest,
)
from consensus.pbft.outbox import Outbox
from consensus.pbft.quorum import CertificateError, check_commit_cert
from consensus.pbft.state import ChunkTransfer, PendingRestore, ReplicaState
from consensus.snapshot_chunks import (
    ChunkAssembly,
    ChunkError,
    check_manifest,
    chunk_count,
    chunk_hashes,
    chunk_of,
    snapshot_digest,
)
from mesh import wire
from mesh.core import Offload, Offloaded

__all__ = ["rate_ok", "on_state_request", "on_state_reply", "on_snapshot_manifest",
           "on_snapshot_fetch", "on_snapshot_chunk", "fetch_next_chunk", "on_restored",
           "restore_ledger", "RESTORE", "CHUNKS_PER_INTERVAL"]

#: The first two items of an offloaded restore's key, ``("pbft", "restore", seq)``.
RESTORE = ("pbft", "restore")

#: Chunks (1 MiB each) served to one peer per status interval: a peer that asks again
#: and again cannot turn us into an amplifier beyond this.
CHUNKS_PER_INTERVAL = 64


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
        if len(st.stable_snapshot) > snapshot_chunks.CHUNK:
            manifest = SnapshotManifest(st.low, st.stable_proof, len(st.stable_snapshot),
                                        _stable_hashes(st))
            out.send(peer, out.sign(manifest))
            return
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
        if st.restoring is not None and st.restoring.seq >= sr.checkpoint_seq:
            return  # being rebuilt; its entries are asked for after it
        try:
            state_digest = checkpoint.check_stable_proof(st, sr.checkpoint_seq,
                                                         sr.checkpoint_proof)
            if snapshot_digest(cu.snapshot) != state_digest:
                raise CertificateError("snapshot does not match the proven digest")
            ledger = None if st.cfg.offload_restore else Ledger.restore(
                st.q.members, cu.snapshot, st.operators)
        except (CertificateError, wire.WireError, LedgerInvariantError):
            st.evidence.count_malformed(env.sender)
            st.count("bad_state_replies")
            return
        if ledger is None:
            # (the entries after it are asked for again once it is installed)
            _offload_restore(st, out, PendingRestore(
                sr.checkpoint_seq, sr.checkpoint_proof, cu.snapshot, env.sender))
            return
        _install(st, out, sr.checkpoint_seq, sr.checkpoint_proof, cu.snapshot, ledger)
    _take_entries(st, out, now, env.sender, cu.entries)


def _take_entries(st: ReplicaState, out: Outbox, now: float, sender: str,
                  entries: Iterable[CommittedEntry]) -> None:
    """Decide the committed entries a STATE-REPLY carried (each checked against its
    commit certificate and batch digest) from ours on, and execute what is ready."""
    for e in entries:
        if e.seq <= st.last_exec:
            continue
        if e.seq != st.last_exec + 1:
            break
        try:
            d = check_commit_cert(st.verifier, st.q, e.seq, e.commits)
        except CertificateError:
            st.evidence.count_malformed(sender)
            break
        if digest(e.batch) != d:
            st.evidence.count_malformed(sender)
            break
        st.batches[d] = e.batch
        agreement.decide(st, out, now, e.seq, d, e.commits, e.batch)
    execution.execute_ready(st, out, now)


def _install(st: ReplicaState, out: Outbox, seq: int, proof: tuple[Signed, ...],
             snapshot: bytes, ledger: Ledger, hashes: tuple[bytes, ...] | None = None) -> None:
    """Take the proven state of checkpoint ``seq``."""
    st.ledger = ledger
    st.last_exec = seq
    st.count("state_transfers")
    # Reported before the checkpoint is logged: a crash right after that write
    # restarts the replica from it, and whoever follows its executions must know.
    out.notify("pbft.state-transfer", {"seq": seq})
    checkpoint.make_stable(st, out, seq, snapshot, proof, hashes)
    for key in [k for k in st.pending if ledger.executed_result(*k) is not None]:
        st.drop_pending(key)
    if st.chunked is not None and st.chunked.seq <= seq:
        st.chunked = None


def _stable_hashes(st: ReplicaState) -> tuple[bytes, ...]:
    if st.stable_hashes[0] != st.low:
        st.stable_hashes = (st.low, chunk_hashes(st.stable_snapshot))
    return st.stable_hashes[1]


def fetch_next_chunk(st: ReplicaState, out: Outbox, now: float) -> None:
    """Ask the transfer's source for the first chunk we miss."""
    t = st.chunked
    if t is None:
        return
    index = t.chunks.missing()
    if index is None:
        return
    st.transfer_until = now + 2 * st.cfg.status_interval
    out.send(t.source, out.sign(SnapshotFetch(t.seq, index)))


def on_snapshot_manifest(st: ReplicaState, out: Outbox, now: float, env: Envelope,
                         sm: SnapshotManifest) -> None:
    if sm.checkpoint_seq <= st.last_exec or (st.restoring is not None
                                             and st.restoring.seq >= sm.checkpoint_seq):
        return
    t = st.chunked
    if t is not None and t.seq >= sm.checkpoint_seq:
        if t.seq == sm.checkpoint_seq:  # the same checkpoint: go on from this peer
            t.source = env.sender
            fetch_next_chunk(st, out, now)
        return
    try:
        state_digest = checkpoint.check_stable_proof(st, sm.checkpoint_seq, sm.checkpoint_proof)
        check_manifest(sm.size, sm.chunk_hashes, state_digest)
    except (CertificateError, ChunkError):
        st.evidence.count_malformed(env.sender)
        st.count("bad_state_replies")
        return
    st.chunked = ChunkTransfer(sm.checkpoint_seq, sm.checkpoint_proof,
                               ChunkAssembly(sm.size, sm.chunk_hashes), env.sender)
    st.count("snapshot_manifests")
    fetch_next_chunk(st, out, now)


def on_snapshot_fetch(st: ReplicaState, out: Outbox, now: float, peer: str,
                      sf: SnapshotFetch) -> None:
    if sf.checkpoint_seq == st.low:
        snapshot = st.stable_snapshot
    elif sf.checkpoint_seq == st.prev_stable[0]:
        snapshot = st.prev_stable[1]  # the checkpoint moved on while the peer fetched
    else:
        return  # not a checkpoint we hold (the requester asks another peer)
    size = len(snapshot)
    if size <= snapshot_chunks.CHUNK or sf.index >= chunk_count(size):
        return
    start, served = st.chunks_served.get(peer, (now, 0))
    if now - start >= st.cfg.status_interval:
        start, served = now, 0
    if served >= CHUNKS_PER_INTERVAL:
        st.count("snapshot_chunks_refused")
        return
    st.chunks_served[peer] = (start, served + 1)
    st.count("snapshot_chunks_served")
    out.send(peer, out.sign(SnapshotChunk(sf.checkpoint_seq, sf.index),
                            chunk_of(snapshot, sf.index)))


def on_snapshot_chunk(st: ReplicaState, out: Outbox, now: float, env: Envelope,
                      sc: SnapshotChunk) -> None:
    t = st.chunked
    if t is None or sc.checkpoint_seq != t.seq:
        return
    if t.seq <= st.last_exec:
        st.chunked = None
        return
    st.count("state_transfer_bytes", len(env.attachment))
    try:
        fresh = t.chunks.add(sc.index, env.attachment)
    except ChunkError:
        st.evidence.count_malformed(env.sender)
        st.count("bad_state_replies")
        if env.sender == t.source:  # ask another peer now
            st.transfer_until = 0.0
            checkpoint.request_state(st, out, now)
        return
    if t.chunks.missing() is not None:
        # A fresh chunk from anyone moves the fetch on, from the peer asked last (a
        # retry may have asked another for the same chunk: the first to answer goes on,
        # the duplicate adds nothing; following only the source stalled the transfer
        # until the next retry whenever the other answered first).
        if fresh:
            fetch_next_chunk(st, out, now)
        return
    snapshot = t.chunks.join()
    st.chunked = None
    if st.cfg.offload_restore:
        _offload_restore(st, out, PendingRestore(t.seq, t.proof, snapshot, None,
                                                 t.chunks.hashes))
        return
    try:
        ledger = Ledger.restore(st.q.members, snapshot, st.operators)
    except (wire.WireError, LedgerInvariantError):
        # every chunk matched the state 2f+1 replicas signed: not a sender's fault
        st.count("bad_state_replies")
        return
    _install(st, out, t.seq, t.proof, snapshot, ledger)
    st.transfer_until = 0.0
    checkpoint.request_state(st, out, now)  # the entries after the checkpoint


def restore_ledger(members: tuple[str, ...], snapshot: bytes,
                   operators: OperatorTable | None) -> Ledger:
    """The ledger of a proven snapshot (raises ``wire.WireError`` or
    :class:`LedgerInvariantError` as :meth:`Ledger.restore`), with its snapshot encoder's
    cache filled: the first checkpoint after the install then encodes only what changed
    (a cold snapshot of 100,000 VMs took 2 s quiet, on the step that makes it). A pure
    function of its arguments, for a worker thread (``Offload``)."""
    ledger = Ledger.restore(members, snapshot, operators)
    ledger.snapshot()
    return ledger


def _offload_restore(st: ReplicaState, out: Outbox, pending: PendingRestore) -> None:
    """Hand the rebuild of ``pending``'s ledger to the driver (one at a time: a later
    checkpoint replaces an earlier one still running, whose outcome is then ignored)."""
    if pending.seq <= st.last_exec or (st.restoring is not None
                                       and st.restoring.seq >= pending.seq):
        return
    st.restoring = pending
    st.count("restores_offloaded")
    out.offload(Offload(RESTORE + (pending.seq,), functools.partial(
        restore_ledger, st.q.members, pending.snapshot, st.operators)))


def on_restored(st: ReplicaState, out: Outbox, now: float, done: Offloaded) -> None:
    """The outcome of an offloaded restore: install its ledger if the replica is still
    below that checkpoint, and ask for what follows; a refused snapshot is counted as
    the inline path counts it. The install's step executes nothing after it (so the
    ledger the step leaves is the restored one, which the node's core compares with
    what it saw using what it computed off the loop: federation.migration.dc_core)."""
    p = st.restoring
    if p is None or done.key != RESTORE + (p.seq,):
        return  # superseded by a later checkpoint's restore
    st.restoring = None
    st.transfer_until = 0.0
    if done.error is not None:
        if not isinstance(done.error, (wire.WireError, LedgerInvariantError)):
            raise done.error  # a bug in the restore, as it would be inline
        st.count("bad_state_replies")
        if p.sender is not None:
            st.evidence.count_malformed(p.sender)
        checkpoint.request_state(st, out, now)
        return
    if p.seq > st.last_exec:
        ledger = done.result
        if not isinstance(ledger, Ledger):
            raise TypeError(f"an offloaded restore returned {type(ledger).__name__}")
        _install(st, out, p.seq, p.proof, p.snapshot, ledger, p.hashes)
    checkpoint.request_state(st, out, now)
