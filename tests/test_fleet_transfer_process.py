"""State transfer of a fleet-sized ledger between real replica processes on loopback
(bench.consensus's node: websocket links, secure channels, SQLite with
``synchronous=FULL``): three replicas start from a stable checkpoint of a ledger of
100,000 VMs (a snapshot of about 16 MB, twice what one frame may carry), logged in
their stores; the fourth starts empty and must reach the same ledger by fetching the
snapshot's manifest and chunks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench.consensus import Cluster, bench_identity, bench_operators
from consensus.pbft.durable import CheckpointRecord, ReplicaLog
from consensus.pbft.messages import Checkpoint, seal
from consensus.snapshot_chunks import chunk_count, snapshot_digest
from mesh.runtime.sqlite_store import SQLiteStore
from tests.harness.fleet_ledger import fleet_ledger

SEQ = 128  # the first checkpoint (consensus.pbft.state.CHECKPOINT_INTERVAL)


def _seed_checkpoint(c: Cluster, names: list[str], snap: bytes) -> None:
    proof = tuple(seal(bench_identity(m), m, Checkpoint(SEQ, snapshot_digest(snap))).signed
                  for m in c.names[:3])
    for m in names:
        store = SQLiteStore(c.dir / f"{m}.sqlite3")
        try:
            for w in ReplicaLog(store).checkpoint(CheckpointRecord(SEQ, snap, proof)):
                store.put(w.key, w.value, w.sync)
        finally:
            store.close()


def _wait_caught_up(c: Cluster, name: str, digest: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = c.status(name)
        if st is not None and st["last_exec"] >= SEQ and st["digest"]:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not catch up within {timeout} s: {st}; "
                                 f"see {c.dir}/{name}.stderr")
        time.sleep(0.1)


def _transfer(tmp_path: Path, vms: int, timeout: float) -> None:
    c = Cluster(4, tmp_path)
    ledger = fleet_ledger(c.names, vms, bench_operators())
    snap = ledger.snapshot()
    digest = ledger.state_digest().hex()
    _seed_checkpoint(c, c.names[:3], snap)
    try:
        c.start_all({})
        c.go(c.names)
        st = _wait_caught_up(c, c.names[3], digest, timeout)
        assert st["digest"] == digest and st["last_exec"] == SEQ
        metrics = st["metrics"]
        assert metrics["snapshot_manifests"] >= 1 and metrics["state_transfers"] == 1
        assert metrics.get("bad_state_replies", 0) == 0
        assert metrics["state_transfer_bytes"] >= len(snap)
        others = [c.status(m) for m in c.names[:3]]
        served = sum((o or {}).get("metrics", {}).get("snapshot_chunks_served", 0)
                     for o in others)
        assert served >= chunk_count(len(snap))
    finally:
        c.stop()
    # the caught-up replica logged the checkpoint in chunks and recovers from them
    store = SQLiteStore(tmp_path / f"{c.names[3]}.sqlite3")
    try:
        rec = ReplicaLog(store).load().checkpoint
    finally:
        store.close()
    assert rec is not None and rec.seq == SEQ and rec.snapshot == snap


@pytest.mark.slow
def test_a_100000_vm_ledger_moves_by_state_transfer_between_processes(tmp_path: Path) -> None:
    _transfer(tmp_path, 100_000, 240.0)


def test_a_chunked_ledger_moves_by_state_transfer_between_processes(tmp_path: Path) -> None:
    # 8,000 VMs: 1.3 MB, two chunks (the smoke of the run above, in make test)
    _transfer(tmp_path, 8_000, 60.0)
