"""``dwcp bench rollout``: how exact the rollout's percentage is, and how fast the ledger's
automatic rollback reaches every DC (issue 16 item 8).

- ``percent_*``: for every percentage 1..99, the share of ``--vms`` VM ids
  (``vm-000000`` ...) that :func:`consensus.ledger.v3_allowed` gives v3 with that
  percentage and no targets, against the percentage: the largest and the mean absolute
  difference in percentage points, and the shares at 1, 10, 50 and 90 %.
- ``rollback_ms_p50`` / ``_p99`` / ``_max``: four DC nodes in this process
  (:class:`federation.node.assembly.Node`: real secure channels on loopback, PBFT, SQLite
  ledgers, the node cores), under a load of ledger commands from the other DCs (a VM
  registered every ``--load-interval`` seconds at each of dc2..dc4). Per sample an admin
  records a policy that rolls back at the first verification failure, dc1 begins a v3
  migration of one of its VMs to dc2 and then states its abort for a failed verification
  (the command a source submits when its target's copy did not hash to the announced
  root); the time is from that submission until the ledger of *every* DC holds the
  rolled-back policy, i.e. until every DC's migration sessions were handed the
  ``PolicyChanged`` that moves in-flight v3 transfers to v1. The issue's bound is 5 s.

The nodes share this process and its GIL with the load; on the shared 2-core machine the
figures are an upper bound of what separate processes see.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from consensus.authz import Authorization
from consensus.ledger import (
    AbortMigration,
    BeginMigration,
    ImportVm,
    MigrateVm,
    RegisterVm,
    SetPolicy,
    v3_allowed,
)
from federation import config
from federation.api.auth import load_operator_key, sign_request
from federation.api.http import serve_node
from federation.cli.keys import INIT_OPERATOR, init_federation
from federation.demo.processes import free_base_port
from federation.node.assembly import Node
from federation.vms.image_backend import ImageBackend
from mesh import identity, wire
from mesh.runtime.log import JsonLog

__all__ = ["register", "percent_accuracy", "run_rollback"]

VERIFY_FAILED = ("the target dc2 gave up: the root of the received images does not match "
                 "the root the source announced")


def percent_accuracy(vms: int) -> dict[str, Any]:
    """The rollout's share of ``vms`` VM ids per percentage, against the percentage."""
    names = [f"vm-{i:06d}" for i in range(vms)]
    errors: dict[int, float] = {}
    shares: dict[int, float] = {}
    for pct in range(1, 100):
        policy = SetPolicy(pct, (), (), False)
        got = sum(v3_allowed(policy, vm, "dc1", "dc2") for vm in names)
        shares[pct] = 100.0 * got / vms
        errors[pct] = abs(shares[pct] - pct)
    worst = max(errors, key=lambda p: errors[p])
    return {
        "percent_vm_ids": vms,
        "percent_max_abs_error_points": round(errors[worst], 3),
        "percent_max_error_at": worst,
        "percent_mean_abs_error_points": round(statistics.fmean(errors.values()), 3),
        **{f"percent_share_at_{p}": round(shares[p], 2) for p in (1, 10, 50, 90)},
    }


class _Admin:
    """Signs operator requests as the federation's admin (keys/admin.key)."""

    def __init__(self, fed: config.Federation, key: Path) -> None:
        self.fed = fed
        self.key = load_operator_key(key, fed)

    def auth(self, method: str, target: str, intent: object) -> Authorization:
        body = wire.encode(intent)
        return Authorization(sign_request(self.key, self.fed, method, target, body,
                                          time.time()), body)


def _node(cfg: Path, name: str, root: Path) -> Node:
    fed = config.load(cfg)
    ident = identity.load_key_file(cfg.parent / "keys" / f"{name}.key")
    return Node(fed, name, ident, root / name, log=JsonLog(name, io.StringIO()),
                backend=ImageBackend(root / name / "vms"))


async def _rollback_samples(cfg: Path, root: Path, samples: int,
                            load_interval: float) -> tuple[list[float], int]:
    names = ("dc1", "dc2", "dc3", "dc4")
    nodes = {n: _node(cfg, n, root) for n in names}
    admin = _Admin(nodes["dc1"].fed, cfg.parent / "keys" / f"{INIT_OPERATOR}.key")
    times: list[float] = []
    loaded = [0]
    try:
        async with trio.open_nursery() as nursery:
            for node in nodes.values():
                await nursery.start(serve_node, node)
            await _until(lambda: all(len(n.runtime.links) == 3 for n in nodes.values()), 30)
            dc1 = nodes["dc1"]

            async def load(node: Node) -> None:
                i = 0
                while True:
                    i += 1
                    vm = f"load-{node.name}-{i}"
                    intent = ImportVm(vm, node.name, "/bench")
                    await node.ledger.submit(RegisterVm(vm, node.name, admin.auth(
                        "POST", "/api/vms", intent)))
                    loaded[0] += 1
                    await trio.sleep(load_interval)

            async with trio.open_nursery() as load_nursery:
                for n in names[1:]:
                    load_nursery.start_soon(load, nodes[n])
                for k in range(samples):
                    times.append(await _one_rollback(nodes, dc1, admin, k))
                load_nursery.cancel_scope.cancel()
            for node in nodes.values():
                node.shutdown()
    finally:
        for node in nodes.values():
            node.close()
    return times, loaded[0]


async def _one_rollback(nodes: dict[str, Node], dc1: Node, admin: _Admin, k: int) -> float:
    policy = SetPolicy(100, (), (), False, max_verify_failures=1)
    await dc1.set_policy(policy, authorization=admin.auth("POST", "/api/policy", policy))
    await _until(lambda: all(not n.need_core().ledger.policy.kill_switch
                             for n in nodes.values()), 30)
    vm, mid = f"bench-vm-{k}", f"bench-vm-{k}-dc1-dc2"
    result = await dc1.ledger.submit(RegisterVm(vm, "dc1", admin.auth(
        "POST", "/api/vms", ImportVm(vm, "dc1", "/bench"))))
    assert result.ok, result.error
    intent = MigrateVm(vm, "dc2", "dc1", 0)
    result = await dc1.ledger.submit(BeginMigration(
        vm, "dc1", "dc2", 0, mid, admin.auth("POST", "/api/migrations", intent), 3))
    assert result.ok, result.error
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dc1.ledger.submit, AbortMigration(mid, None, VERIFY_FAILED,
                                                             "verification"))
        await _until(lambda: all(n.need_core().ledger.policy.rolled_back
                                 for n in nodes.values()), 30, step=0.0005)
        elapsed = time.perf_counter() - t0
    return elapsed


async def _until(cond: Any, timeout: float, step: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(step)


def _pct(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of sorted values."""
    idx = max(0, min(len(sorted_ms) - 1, int(round(q * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[idx]


def run_rollback(samples: int, load_interval: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-rollout-") as tmp:
        root = Path(tmp)
        cfg = init_federation(root / "fed", 4, base_port=free_base_port(4))
        started = time.perf_counter()
        times, loaded = trio.run(_rollback_samples, cfg, root / "data", samples,
                                 load_interval)
        wall = time.perf_counter() - started
    ms = sorted(t * 1000 for t in times)
    return {
        "rollback_samples": len(ms),
        "rollback_ms_p50": round(_pct(ms, 0.50), 1),
        "rollback_ms_p99": round(_pct(ms, 0.99), 1),
        "rollback_ms_max": round(ms[-1], 1),
        "rollback_load_commands": loaded,
        "rollback_load_commands_per_s": round(loaded / wall, 1),
    }


def run(args: argparse.Namespace) -> int:
    out = percent_accuracy(args.vms)
    if args.samples:
        out.update(run_rollback(args.samples, args.load_interval))
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rollout", help="rollout percentage accuracy and the ledger's "
                                       "automatic rollback time")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.add_argument("--vms", type=int, default=10_000,
                   help="VM ids for the percentage accuracy (default 10000)")
    p.add_argument("--samples", type=int, default=30,
                   help="rollbacks to time (default 30; 0 skips the nodes)")
    p.add_argument("--load-interval", type=float, default=0.02,
                   help="seconds between two ledger commands of each loading DC (default "
                        "0.02: up to 50/s each from dc2, dc3, dc4)")
    p.set_defaults(func=run)
