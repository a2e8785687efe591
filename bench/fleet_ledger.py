"""The ledger phase of ``dwcp bench fleet``: a ledger of ``vms`` VMs.

- ``snapshot_*``: a :class:`consensus.ledger.Ledger` that executed ``vms`` registrations,
  each an operator's signed ``RegisterVm`` checked as every replica checks it; the time of
  the checkpoint snapshot a replica takes every ``checkpoint_interval`` sequence numbers
  (:meth:`Ledger.snapshot` after a batch of new registrations: the incremental encoder's
  work), a cold one (every record encoded), its size, and :meth:`Ledger.restore` of it
  (what a replica receiving a state transfer runs).
- ``transfer_*``: four replica processes on loopback (:class:`bench.consensus.Cluster`:
  websocket links, secure channels, SQLite with ``synchronous=FULL``, the node's own
  ledger path); one is killed (SIGKILL) right after the links are up, the other three
  register VMs until their ledgers hold ``vms``; then the killed one starts again and
  catches up by PBFT state transfer (a stable checkpoint's snapshot, then committed
  entries): the time from its restart to a ledger equal to the others' (same sequence
  number and state digest), from its links being up, and the bytes of state replies it
  took (``state_transfer_bytes`` in the replica's metrics).
- ``chunked_*`` (:func:`chunked_transfer_figures`): the same four processes where three
  start from a stable checkpoint of a ledger of ``vms`` VMs (built from its records by
  :func:`fleet_ledger`: each VM moved once by a committed migration, about 160 bytes per
  VM, so 100,000 VMs make a 16 MB snapshot, past one frame's 8 MiB) logged in their
  stores, and the fourth starts empty: the time from its start to the same ledger, by
  the chunked snapshot (:mod:`consensus.snapshot_chunks`), and from all four processes'
  links being up (the three restore their checkpoint first), and the bytes and chunks.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.consensus import (
    BENCH_OPERATOR,
    PRESIGN_RATE,
    Cluster,
    bench_identity,
    bench_operators,
    names_for,
)
from consensus.authz import OperatorTable, authorize
from consensus.ledger import ImportVm, Ledger, RegisterVm
from consensus.ledger_commands import MigrationRecord, VmRecord
from consensus.pbft.durable import CheckpointRecord, ReplicaLog
from consensus.pbft.messages import Checkpoint, seal
from consensus.pbft.state import CHECKPOINT_INTERVAL
from consensus.snapshot_chunks import chunk_count, snapshot_digest
from mesh import wire
from mesh.runtime.sqlite_store import SQLiteStore

__all__ = ["snapshot_figures", "transfer_figures", "fleet_ledger", "chunked_transfer_figures"]

#: Registrations per loading node's caller window (bench.consensus's batched window).
WINDOW = 24
#: Seconds the load may take at most: each loader stops once it made its share of
#: ``vms`` registrations (at 150 commits/s, the slowest seen under load, 10,000 take 67 s).
LOAD_LIMIT_S = 600.0


def snapshot_figures(vms: int) -> dict[str, Any]:
    members = names_for(4)
    ledger = Ledger(members, bench_operators())
    operator = bench_identity("operator/" + BENCH_OPERATOR)
    now = time.time()

    def register(i: int) -> None:
        vm = f"vm-{i:06d}"
        auth = authorize(operator, "bench", BENCH_OPERATOR, ImportVm(vm, members[i % 4], "/b"),
                         now, f"fleet-{i:08d}")
        ledger.execute(members[i % 4], i // 4 + 1, wire.encode(RegisterVm(vm, members[i % 4],
                                                                          auth)), now)

    t = time.perf_counter()
    for i in range(vms - CHECKPOINT_INTERVAL):
        register(i)
    ledger.snapshot()  # the previous checkpoint
    register_s = time.perf_counter() - t
    for i in range(vms - CHECKPOINT_INTERVAL, vms):
        register(i)
    t = time.perf_counter()
    snap = ledger.snapshot()
    incremental = time.perf_counter() - t
    cold_ledger = Ledger.restore(members, snap, bench_operators())
    t = time.perf_counter()
    again = cold_ledger.snapshot()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    Ledger.restore(members, snap, bench_operators())
    restore = time.perf_counter() - t
    if again != snap or len(ledger.vms) != vms:
        raise RuntimeError("the restored ledger's snapshot differs from the original's")
    return {"ledger_vms": vms, "register_us_per_vm": round(register_s / vms * 1e6, 1),
            "snapshot_ms": round(incremental * 1000, 2),
            "snapshot_cold_ms": round(cold * 1000, 2),
            "snapshot_bytes": len(snap), "restore_ms": round(restore * 1000, 2)}


def transfer_figures(vms: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-fleet-") as tmp:
        c = Cluster(4, Path(tmp))
        loaders = c.names[:3]
        down = c.names[3]
        try:
            share = math.ceil(vms / len(loaders))
            c.start_all({m: (WINDOW, LOAD_LIMIT_S) for m in loaders}, min(share, PRESIGN_RATE),
                        limit=share)
            c.kill(down)
            t = time.perf_counter()
            c.go(loaders)
            committed = sum(len(c.result(m, LOAD_LIMIT_S + 60.0)["latencies"])
                            for m in loaders)
            load_s = time.perf_counter() - t
            if committed < vms:
                raise RuntimeError(f"the load registered {committed} VMs, fewer than {vms} "
                                   f"within {LOAD_LIMIT_S} s")
            target = _settled(c, loaders)
            t0 = time.perf_counter()
            c.start(down)
            c.wait_ready([down])
            linked = time.perf_counter() - t0
            c.go([down])
            deadline = time.monotonic() + 300
            while True:
                st = c.status(down)
                if st is not None and st["last_exec"] >= target["last_exec"] and st["digest"]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{down} did not catch up within 300 s: {st}")
                time.sleep(0.05)  # the status file is rewritten every 0.2 s
            took = time.perf_counter() - t0
            if st["digest"] != target["digest"] and st["last_exec"] == target["last_exec"]:
                raise RuntimeError(f"{down}'s ledger differs after the state transfer")
            metrics = st["metrics"]
        finally:
            c.stop()
    return {"transfer_vms": committed, "transfer_load_commits_per_s": round(committed / load_s),
            "transfer_seq": target["last_exec"],
            "transfer_s": round(took, 2), "transfer_after_links_s": round(took - linked, 2),
            "transfer_bytes": metrics.get("state_transfer_bytes"),
            "transfer_state_transfers": metrics.get("state_transfers")}


def _settled(c: Cluster, names: list[str]) -> dict[str, Any]:
    """The loaders' common (last_exec, digest) once their ledgers stand still and agree."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sts = [c.status(m) for m in names]
        if all(s is not None and s["digest"] for s in sts):
            keys = {(s["last_exec"], s["digest"]) for s in sts if s is not None}
            if len(keys) == 1:
                last_exec, dig = keys.pop()
                return {"last_exec": last_exec, "digest": dig}
        time.sleep(0.2)  # the status period
    raise RuntimeError("the loading replicas did not settle on one ledger within 120 s")


def fleet_ledger(members: list[str], vms: int, operators: OperatorTable | None = None) -> Ledger:
    """A ledger of ``vms`` VMs spread over ``members``, each moved once by a committed
    migration, built from its records (no command executed per VM) and restored from its
    snapshot, so every invariant a replica checks holds."""
    ledger = Ledger(members, operators)
    n = len(members)
    for i in range(vms):
        vm = f"fleet-vm-{i:07d}"
        source, target = members[i % n], members[(i + 1) % n]
        mid = f"mig-{vm}-2"
        ledger.vms[vm] = VmRecord(vm, target, 2, None)
        ledger.migrations[mid] = MigrationRecord(
            mid, vm, source, target, 2, "committed", bytes([i % 251]) * 32,
            bytes([i % 251]) * 32, 600.0 + i, 3)
    return Ledger.restore(members, ledger.snapshot(), operators)


def chunked_transfer_figures(vms: int, timeout: float = 300.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-fleet-") as tmp:
        c = Cluster(4, Path(tmp))
        c.watch_loop = True
        t = time.perf_counter()
        ledger = fleet_ledger(c.names, vms, bench_operators())
        snap = ledger.snapshot()
        build_s = time.perf_counter() - t
        digest = snapshot_digest(snap)
        seq = CHECKPOINT_INTERVAL
        proof = tuple(seal(bench_identity(m), m, Checkpoint(seq, digest)).signed
                      for m in c.names[:3])
        for m in c.names[:3]:
            store = SQLiteStore(c.dir / f"{m}.sqlite3")
            try:
                for w in ReplicaLog(store).checkpoint(CheckpointRecord(seq, snap, proof)):
                    store.put(w.key, w.value, w.sync)
            finally:
                store.close()
        down = c.names[3]
        try:
            # all four at once: the three recover their checkpoint (a restore of the
            # ledger) before their links come up; ``chunked_after_links_s`` is the transfer
            t0 = time.perf_counter()
            for m in c.names:
                c.start(m)
            _wait_ready(c, timeout)  # the three restore the checkpoint first (no 60 s bound)
            linked = time.perf_counter() - t0
            c.go(c.names)
            deadline = time.monotonic() + timeout
            while True:
                st = c.status(down)
                if st is not None and st["last_exec"] >= seq and st["digest"]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{down} did not catch up within {timeout} s: {st}")
                time.sleep(0.05)
            took = time.perf_counter() - t0
            if st["digest"] != digest.hex() or st["last_exec"] != seq:
                raise RuntimeError(f"{down}'s ledger differs after the state transfer: {st}")
            served = sum((c.status(m) or {}).get("metrics", {}).get("snapshot_chunks_served", 0)
                         for m in c.names[:3])
            metrics = st["metrics"]
        finally:
            c.stop()
        store = SQLiteStore(c.dir / f"{down}.sqlite3")
        try:
            rec = ReplicaLog(store).load().checkpoint
        finally:
            store.close()
        if rec is None or rec.seq != seq or rec.snapshot != snap:
            raise RuntimeError(f"{down} did not log the checkpoint it took")
    return {"chunked_vms": vms, "chunked_snapshot_bytes": len(snap),
            "chunked_chunks": chunk_count(len(snap)), "chunked_build_s": round(build_s, 2),
            "chunked_transfer_s": round(took, 2),
            "chunked_after_links_s": round(took - linked, 2),
            "chunked_transfer_bytes": metrics.get("state_transfer_bytes"),
            "chunked_manifests": metrics.get("snapshot_manifests"),
            "chunked_chunks_served": served,
            "chunked_bad_replies": metrics.get("bad_state_replies", 0),
            "chunked_state_transfers": metrics.get("state_transfers"),
            # the receiver's event loop from its start to its catching up: the longest it
            # ran nothing else (keepalives are answered within 5 s), links it lost
            "chunked_loop_stall_max_ms": st.get("loop_stall_max_ms"),
            "chunked_loop_ticks": st.get("loop_ticks"),
            "chunked_peer_downs": st.get("peer_downs"),
            "chunked_restores_offloaded": metrics.get("restores_offloaded", 0)}


def _wait_ready(c: Cluster, timeout: float) -> None:
    """Each node's READY line (its links are up), within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    for name in c.names:
        proc = c.procs[name]
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY" or time.monotonic() > deadline:
            raise RuntimeError(f"node {name} did not come up within {timeout} s: see "
                               f"{c.dir}/{name}.stderr")
