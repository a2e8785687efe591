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
from consensus.authz import authorize
from consensus.ledger import ImportVm, Ledger, RegisterVm
from consensus.pbft.state import CHECKPOINT_INTERVAL
from mesh import wire

__all__ = ["snapshot_figures", "transfer_figures"]

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
