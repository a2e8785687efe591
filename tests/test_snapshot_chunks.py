"""The chunked ledger snapshot (consensus.snapshot_chunks): its digest (unchanged for a
snapshot of one chunk), the chunk decoder and assembly against a Byzantine sender, a
ledger past one frame's 8 MiB, the durable chunked checkpoint, and state transfer
by manifest and chunks in the simulator."""

from __future__ import annotations

import hashlib
import random

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.fleet_ledger import fleet_ledger
from consensus import snapshot_chunks
from consensus.ledger import Ledger
from consensus.pbft.durable import CheckpointRecord, ChunkedCheckpoint, ReplicaLog
from consensus.pbft.messages import (
    SnapshotChunk,
    SnapshotFetch,
    SnapshotManifest,
    seal,
)
from consensus.pbft.replica import Replica
from consensus.snapshot_chunks import (
    ChunkAssembly,
    ChunkError,
    check_manifest,
    chunk_count,
    chunk_hashes,
    chunk_of,
    manifest_digest,
    snapshot_digest,
)
from mesh import wire
from mesh.core import Persist, Received, Send
from sim import partitions
from sim.hosts.pbft_cluster import PbftCluster, identity_for
from sim.store import SimStore
from tests.harness.pbft import SMALL, cluster, register_many, run_until_settled

NAMES = ("n00", "n01", "n02", "n03")


# --------------------------------------------------------------------------- digest


def test_a_snapshot_of_one_chunk_keeps_its_plain_sha256_digest() -> None:
    # what every checkpoint of a small federation signed before chunks existed
    for data in (b"", b"x", bytes(snapshot_chunks.CHUNK)):
        assert snapshot_digest(data) == hashlib.sha256(data).digest()
    ledger = Ledger(NAMES)
    assert ledger.state_digest() == hashlib.sha256(ledger.snapshot()).digest()


def test_a_larger_snapshot_is_digested_through_its_manifest() -> None:
    data = random.Random(1).randbytes(2 * snapshot_chunks.CHUNK + 5)
    hashes = chunk_hashes(data)
    assert len(hashes) == chunk_count(len(data)) == 3
    assert b"".join(chunk_of(data, i) for i in range(3)) == data
    assert snapshot_digest(data) == manifest_digest(len(data), hashes)
    assert snapshot_digest(data) != hashlib.sha256(data).digest()
    check_manifest(len(data), hashes, snapshot_digest(data))
    # any other size or hash list is another state
    with pytest.raises(ChunkError, match="does not match the proven state digest"):
        check_manifest(len(data) - 1, hashes, snapshot_digest(data))
    with pytest.raises(ChunkError, match="hashes for"):
        check_manifest(len(data), hashes[:2], snapshot_digest(data))
    with pytest.raises(ChunkError, match="manifest size"):
        check_manifest(snapshot_chunks.MAX_SNAPSHOT + 1, hashes, snapshot_digest(data))


# --------------------------------------------------------------------------- decoder


SIZE = 3 * 1024 + 17


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(snapshot_chunks, "CHUNK", 1024)
    return 1024


@given(st.lists(st.tuples(st.integers(-2, 6), st.binary(max_size=80)), max_size=30),
       st.randoms(use_true_random=False), st.integers(1, 200))
def test_the_assembly_takes_exactly_the_proven_chunks(
        attempts: list[tuple[int, bytes]], rnd: random.Random, size: int) -> None:
    saved = snapshot_chunks.CHUNK
    snapshot_chunks.CHUNK = 64  # (not the monkeypatch fixture: one per hypothesis example)
    try:
        data = rnd.randbytes(size)
        hashes = chunk_hashes(data)
        asm = ChunkAssembly(len(data), hashes)
        honest = [(i, chunk_of(data, i)) for i in range(len(hashes))]
        # a Byzantine sender's arbitrary chunks (and some honest ones in the wrong place),
        # mixed with the honest ones in any order
        wrong = [(i + 1, c) for i, c in honest]
        mixed = attempts + wrong + honest
        rnd.shuffle(mixed)
        for index, payload in mixed:
            try:
                asm.add(index, payload)
            except ChunkError:
                assert not (0 <= index < len(hashes) and payload == chunk_of(data, index))
            assert asm.held <= len(data)
        assert asm.missing() is None
        assert asm.join() == data
    finally:
        snapshot_chunks.CHUNK = saved


@given(st.binary(max_size=300))
def test_the_chunk_messages_decode_or_raise_wire_error(raw: bytes) -> None:
    for cls in (SnapshotManifest, SnapshotFetch, SnapshotChunk):
        try:
            msg = wire.decode(raw, expect=(cls,))
        except wire.WireError:
            continue
        assert wire.encode(msg) == raw


@given(st.integers(0, 2**64 - 1), st.lists(st.binary(min_size=32, max_size=32), max_size=5),
       st.integers(0, 2**64 - 1), st.integers(0, 2000))
def test_manifest_and_fetch_round_trip_within_their_limits(
        seq: int, hashes: list[bytes], size: int, index: int) -> None:
    if size <= snapshot_chunks.MAX_SNAPSHOT:
        m = SnapshotManifest(seq, (), size, tuple(hashes))
        assert wire.decode(wire.encode(m), expect=(SnapshotManifest,)) == m
    else:
        with pytest.raises(wire.WireError, match="size"):
            wire.encode(SnapshotManifest(seq, (), size, tuple(hashes)))
    if index < snapshot_chunks.MAX_CHUNKS:
        f = SnapshotFetch(seq, index)
        assert wire.decode(wire.encode(f), expect=(SnapshotFetch,)) == f
    else:
        with pytest.raises(wire.WireError, match="index"):
            wire.encode(SnapshotFetch(seq, index))


# --------------------------------------------------------------------------- ledger


def _past_one_frame(vms: int) -> None:
    ledger = fleet_ledger(list(NAMES), vms)
    snap = ledger.snapshot()
    assert len(snap) > wire.ABSOLUTE_MAX_SIZE  # one frame could not carry it
    again = Ledger.restore(NAMES, snap)
    assert again.vms == ledger.vms and again.migrations == ledger.migrations
    assert again.state_digest() == ledger.state_digest() == snapshot_digest(snap)
    with pytest.raises(wire.WireError):
        Ledger.restore(NAMES, snap[:-1])
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode_large(snap, type(wire.decode(Ledger(NAMES).snapshot())), len(snap) - 1)


@pytest.mark.slow
def test_a_ledger_past_one_frame_snapshots_and_restores() -> None:
    _past_one_frame(60_000)  # 12 MB


def test_a_ledger_past_one_frame_snapshots_and_restores_smoke(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "ABSOLUTE_MAX_SIZE", 16 * 1024)  # the frame limit, scaled down
    _past_one_frame(600)  # 95 KB: past decode's fast path (64 KiB) too


# --------------------------------------------------------------------------- durable


def _write(store: SimStore, writes: list[Persist]) -> None:
    for w in writes:
        store.put(w.key, w.value, w.sync)


def test_a_chunked_checkpoint_is_logged_in_alternate_areas(small_chunks: int) -> None:
    store = SimStore()
    log = ReplicaLog(store)
    first = random.Random(2).randbytes(3 * small_chunks + 1)
    second = random.Random(3).randbytes(2 * small_chunks + 9)
    writes = log.checkpoint(CheckpointRecord(8, first, ()))
    assert [w.sync for w in writes] == [False] * 4 + [True]  # chunks, then the record
    _write(store, writes)
    assert ReplicaLog(store).load().checkpoint == CheckpointRecord(8, first, ())
    # the next checkpoint goes to the other area: a crash before its record (the
    # chunks are written, not synced, the record lost) leaves the first one whole
    writes = log.checkpoint(CheckpointRecord(16, second, ()))
    assert all(w.key.startswith("pbft/snapshot/1/") for w in writes[:-1])
    _write(store, writes[:-1])
    store.sync()
    assert ReplicaLog(store).load().checkpoint == CheckpointRecord(8, first, ())
    _write(store, writes[-1:])
    reloaded = ReplicaLog(store)
    assert reloaded.load().checkpoint == CheckpointRecord(16, second, ())
    # the third reuses area 0 and blanks its chunk beyond the new snapshot's
    writes = reloaded.checkpoint(CheckpointRecord(24, second, ()))
    assert [w.key for w in writes if w.value == b""] == ["pbft/snapshot/0/0003"]
    _write(store, writes)
    assert ReplicaLog(store).load().checkpoint == CheckpointRecord(24, second, ())
    # a small snapshot is one record, as before chunks existed
    assert len(reloaded.checkpoint(CheckpointRecord(32, b"small", ()))) == 1


def test_a_corrupt_logged_chunk_is_refused(small_chunks: int) -> None:
    store = SimStore()
    data = random.Random(4).randbytes(2 * small_chunks + 3)
    _write(store, ReplicaLog(store).checkpoint(CheckpointRecord(8, data, ())))
    key = "pbft/snapshot/0/0001"
    store.put(key, b"\x00" + (store.get(key) or b"")[1:])
    with pytest.raises(wire.WireError, match="chunk 1 of area 0 does not match"):
        ReplicaLog(store).load()
    raw = store.get(ReplicaLog.CHECKPOINT_KEY)
    assert raw is not None
    rec = wire.decode(raw, expect=(ChunkedCheckpoint,))
    assert rec.size == len(data) and len(rec.chunk_hashes) == 3


# --------------------------------------------------------------------------- simulator


def test_a_lagging_replica_fetches_a_chunked_snapshot(small_chunks: int) -> None:
    c = cluster()
    token = c.world.block(partitions.isolate("n03", c.names))
    register_many(c, 40, step=0.05)
    c.world.run(until=5.0)
    assert len(c.replica("n00").state.stable_snapshot) > 2 * small_chunks
    c.world.unblock(token)
    run_until_settled(c)
    r = c.replica("n03")
    assert r.metrics.get("snapshot_manifests", 0) >= 1
    assert r.metrics.get("state_transfers", 0) >= 1
    assert r.metrics.get("bad_state_replies", 0) == 0
    assert r.ledger.state_digest() == c.replica("n00").ledger.state_digest()
    served = sum(c.replica(m).metrics.get("snapshot_chunks_served", 0) for m in c.names[:3])
    assert served >= chunk_count(len(r.state.stable_snapshot))
    # it restarts from its own chunked checkpoint
    c.world.crash("n03")
    c.world.restart("n03")
    assert c.replica("n03").low == r.low


def _lagging_with_manifest(c: PbftCluster) -> tuple[Replica, SnapshotManifest, bytes]:
    """n03 cut off while the others pass a checkpoint; then n00's manifest handed to it."""
    token = c.world.block(partitions.isolate("n03", c.names))
    register_many(c, 40, step=0.05)
    c.world.run(until=5.0)
    c.world.unblock(token)
    src = c.replica("n00").state
    snap = src.stable_snapshot
    manifest = SnapshotManifest(src.low, src.stable_proof, len(snap), chunk_hashes(snap))
    r = c.replica("n03")
    actions = r.handle(c.world.now, Received("n00", seal(identity_for("n00"), "n00", manifest)))
    fetches = [a for a in actions if isinstance(a, Send)
               and isinstance(wire.decode(a.message.body), SnapshotFetch)]
    assert [wire.decode(f.message.body) for f in fetches] == [SnapshotFetch(src.low, 0)]
    return r, manifest, snap


def test_a_byzantine_chunk_or_manifest_is_refused(small_chunks: int) -> None:
    c = cluster()
    r, manifest, snap = _lagging_with_manifest(c)
    before = r.ledger.state_digest()
    now = c.world.now

    def chunk(sender: str, index: int, data: bytes) -> list[object]:
        body = SnapshotChunk(manifest.checkpoint_seq, index)
        return r.handle(now, Received(sender, seal(identity_for(sender), sender, body, data)))

    # a chunk that is not the proven one: refused, counted, nothing held
    chunk("n00", 0, b"\x00" * small_chunks)
    chunk("n01", 1, chunk_of(snap, 0))
    assert r.metrics["bad_state_replies"] == 2
    assert r.state.chunked is not None and r.state.chunked.chunks.held == 0
    # a manifest for another state (sizes or hashes changed) under the real proof
    for bad in (attrs.evolve(manifest, size=manifest.size + 1),
                attrs.evolve(manifest, chunk_hashes=manifest.chunk_hashes[::-1]),
                attrs.evolve(manifest, checkpoint_seq=manifest.checkpoint_seq + 4)):
        r.state.chunked = None
        r.handle(now, Received("n01", seal(identity_for("n01"), "n01", bad)))
        assert r.state.chunked is None
    assert r.metrics["bad_state_replies"] == 5
    assert r.ledger.state_digest() == before
    # the honest chunks, in any order and from anyone, install the proven state
    r.handle(now, Received("n00", seal(identity_for("n00"), "n00", manifest)))
    order = list(range(chunk_count(len(snap))))
    random.Random(5).shuffle(order)
    for i in order:
        chunk(c.names[i % 3], i, chunk_of(snap, i))
    assert r.state.chunked is None and r.low == manifest.checkpoint_seq
    assert r.ledger.state_digest() == snapshot_digest(snap) != before


def test_a_peer_serves_a_bounded_number_of_chunks_per_interval(small_chunks: int) -> None:
    c = cluster()
    register_many(c, 40, step=0.05)
    run_until_settled(c)
    r = c.replica("n00")
    seq = r.low
    sent = 0
    for _ in range(3 * 64):
        fetch = seal(identity_for("n01"), "n01", SnapshotFetch(seq, 0))
        sent += sum(1 for a in r.handle(c.world.now, Received("n01", fetch))
                    if isinstance(a, Send))
    assert sent == 64 and r.metrics["snapshot_chunks_refused"] == 2 * 64
    fetch = seal(identity_for("n01"), "n01", SnapshotFetch(seq, 0))
    later = c.world.now + SMALL.status_interval
    assert any(isinstance(a, Send) for a in r.handle(later, Received("n01", fetch)))
    # not the checkpoint it holds, or past its last chunk: nothing
    for bad in (SnapshotFetch(seq + 1, 0), SnapshotFetch(seq, 999)):
        env = seal(identity_for("n02"), "n02", bad)
        assert not [a for a in r.handle(later, Received("n02", env)) if isinstance(a, Send)]


_SNAP = fleet_ledger(list(NAMES), 300).snapshot()  # 48 KB: past decode's fast path


@given(st.lists(st.tuples(st.integers(0, len(_SNAP) - 1), st.integers(0, 255)), max_size=4),
       st.integers(0, 8))
def test_decode_large_takes_exactly_what_decode_takes(
        flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_SNAP)
    for pos, byte in flips:
        data[pos] = byte
    raw = bytes(data[:len(data) - cut])
    cls = type(wire.decode(_SNAP))
    try:
        want = wire.decode(raw, expect=(cls,))
    except wire.WireError:
        with pytest.raises(wire.WireError):
            wire.decode_large(raw, cls, snapshot_chunks.MAX_SNAPSHOT)
        return
    assert wire.decode_large(raw, cls, snapshot_chunks.MAX_SNAPSHOT) == want


def test_a_peer_serves_the_checkpoint_before_its_stable_one_and_no_older(
        small_chunks: int) -> None:
    c = cluster()
    register_many(c, 40, step=0.05)
    run_until_settled(c)
    r = c.replica("n00")
    seqs = [r.low]
    snaps = [r.state.stable_snapshot]
    for round_ in range(2):  # two more checkpoints
        for i in range(3 * SMALL.checkpoint_interval):
            c.world.at(c.world.now + 0.05 * (i + 1), lambda w, k=round_, i=i: submit_more(
                c, k, i), "more")
        target = seqs[-1]
        assert c.world.run(until=c.world.now + 30.0,
                           predicate=lambda w, t=target: c.replica("n00").low > t)
        seqs.append(r.low)
        snaps.append(r.state.stable_snapshot)

    def served(seq: int) -> list[bytes]:
        env = seal(identity_for("n02"), "n02", SnapshotFetch(seq, 0))
        return [a.message.attachment for a in r.handle(c.world.now + 100, Received("n02", env))
                if isinstance(a, Send)]

    assert served(seqs[2]) == [chunk_of(snaps[2], 0)]
    assert served(seqs[1]) == [chunk_of(snaps[1], 0)]
    assert served(seqs[0]) == []


def submit_more(c: PbftCluster, k: int, i: int) -> None:
    from tests.harness.ledger import register
    from tests.harness.pbft import submit

    submit(c, c.names[i % 4], register(f"more{k}-{i}", c.names[i % 4]))


def test_a_fresh_chunk_from_the_peer_asked_before_a_retry_moves_the_fetch_on(
        small_chunks: int) -> None:
    c = cluster()
    r, manifest, snap = _lagging_with_manifest(c)  # n00 asked for chunk 0
    assert r.state.chunked is not None
    r.state.chunked.source = "n01"  # a retry asked n01 for it too (request_state)
    body = SnapshotChunk(manifest.checkpoint_seq, 0)
    actions = r.handle(c.world.now, Received("n00", seal(identity_for("n00"), "n00", body,
                                                             chunk_of(snap, 0))))
    fetches = [(a.peer, wire.decode(a.message.body)) for a in actions if isinstance(a, Send)]
    assert fetches == [("n01", SnapshotFetch(manifest.checkpoint_seq, 1))]
    # n01's answer for chunk 0 comes late: a duplicate, nothing more is asked
    actions = r.handle(c.world.now, Received("n01", seal(identity_for("n01"), "n01", body,
                                                             chunk_of(snap, 0))))
    assert not [a for a in actions if isinstance(a, Send)]
