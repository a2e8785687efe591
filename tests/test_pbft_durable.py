"""The replica's durable log (consensus.pbft.durable): each kind of fact has keys of its own,
a later view's PRE-PREPARE never replaces a certificate, the ring never reuses a live
key, a log of the old format or a corrupt record is refused with a clear error."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.pbft.durable import SLOT_RING, CheckpointRecord, LogFormatError, ReplicaLog
from consensus.pbft.messages import (
    Commit,
    NewView,
    Prepare,
    PreparedCert,
    PrePrepare,
    Signed,
    seal,
)
from consensus.pbft.replica import Replica
from mesh import wire
from mesh.core import Persist
from sim.hosts.pbft_cluster import SIM_CONFIG, identity_for
from sim.store import SimStore

NAMES = ("n00", "n01", "n02", "n03")
KEYS = {m: identity_for(m).public for m in NAMES}
D1, D2 = b"\x01" * 32, b"\x02" * 32


def signed(sender: str, body: object) -> Signed:
    return seal(identity_for(sender), sender, body).signed


def cert(view: int, seq: int, dig: bytes) -> PreparedCert:
    primary = NAMES[view % 4]
    prepares = tuple(signed(m, Prepare(view, seq, dig)) for m in NAMES if m != primary)[:2]
    return PreparedCert(signed(primary, PrePrepare(view, seq, dig)), prepares)


def write(store: SimStore, *actions: Persist) -> None:
    for a in actions:
        store.put(a.key, a.value, a.sync)


def test_a_later_views_preprepare_leaves_the_certificates_of_the_same_seq() -> None:
    store = SimStore()
    log = ReplicaLog(store)
    commits = tuple(signed(m, Commit(0, 3, D1)) for m in NAMES[:3])
    write(store,
          log.preprepare(3, signed("n00", PrePrepare(0, 3, D1)), b"batch-1"),
          log.prepared(3, cert(0, 3, D1), b"batch-1"),
          log.committed(3, commits, b"batch-1"),
          log.preprepare(3, signed("n01", PrePrepare(1, 3, D2)), None))
    store.sync()
    rec = ReplicaLog(store).load()
    assert [(r.seq, wire.decode(r.preprepare.body).view) for r in rec.preprepares] == [(3, 1)]
    assert [(r.seq, r.cert) for r in rec.prepared] == [(3, cert(0, 3, D1))]
    assert [(r.seq, r.commits) for r in rec.committed] == [(3, commits)]


def test_the_decision_is_not_synced_and_the_prepared_certificate_is() -> None:
    log = ReplicaLog(SimStore())
    commits = tuple(signed(m, Commit(0, 1, D1)) for m in NAMES[:3])
    assert log.prepared(1, cert(0, 1, D1), None).sync
    assert log.preprepare(1, signed("n00", PrePrepare(0, 1, D1)), None).sync
    assert not log.committed(1, commits, None).sync


def test_records_at_or_below_the_checkpoint_are_dead_and_the_ring_is_bounded() -> None:
    store = SimStore()
    log = ReplicaLog(store)
    write(store, log.prepared(5, cert(0, 5, D1), None))
    write(store, *log.checkpoint(CheckpointRecord(8, b"snap", ())))
    assert log.fits(9) and log.fits(8 + SLOT_RING)
    assert not log.fits(8) and not log.fits(9 + SLOT_RING)
    with pytest.raises(ValueError, match="outside the log's ring"):
        log.prepared(9 + SLOT_RING, cert(0, 9 + SLOT_RING, D1), None)
    write(store, log.prepared(5 + SLOT_RING, cert(0, 5 + SLOT_RING, D2), None))  # key of seq 5
    rec = ReplicaLog(store).load()
    assert rec.checkpoint is not None and rec.checkpoint.seq == 8
    assert [r.seq for r in rec.prepared] == [5 + SLOT_RING]


def test_the_view_record_keeps_the_new_view() -> None:
    store = SimStore()
    log = ReplicaLog(store)
    nv = seal(identity_for("n01"), "n01", NewView(1, (), ()))
    write(store, log.view(1, True, nv))
    rec = ReplicaLog(store).load()
    assert (rec.view.view, rec.view.active, rec.new_view) == (1, True, nv)
    write(store, log.view(2, False))
    rec = ReplicaLog(store).load()
    assert (rec.view.view, rec.view.active, rec.new_view) == (2, False, None)


def test_a_log_of_the_old_format_is_refused_with_a_clear_error() -> None:
    store = SimStore()
    store.put("pbft/slot/001", b"\x00")
    with pytest.raises(LogFormatError, match="empty data directory"):
        ReplicaLog(store).load()
    with pytest.raises(LogFormatError):
        Replica("n00", identity_for("n00"), KEYS, ReplicaLog(store), random.Random(0), SIM_CONFIG)


def test_a_window_larger_than_the_ring_is_refused() -> None:
    import attrs

    with pytest.raises(ValueError, match="window"):
        Replica("n00", identity_for("n00"), KEYS, ReplicaLog(SimStore()), random.Random(0),
                attrs.evolve(SIM_CONFIG, window=SLOT_RING + 1))


@given(st.sampled_from(["pbft/view", "pbft/checkpoint", "pbft/pp/001", "pbft/prepared/002",
                        "pbft/committed/003"]), st.binary(max_size=200))
def test_a_corrupt_record_is_a_wire_error_never_another_exception(key: str, raw: bytes) -> None:
    store = SimStore()
    store.put(key, raw)
    try:
        ReplicaLog(store).load()
    except (wire.WireError, LogFormatError):
        pass
