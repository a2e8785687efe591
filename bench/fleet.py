"""``dwcp bench fleet --json``: DWCP at fleet scale (issue 18 item 3).

Three phases, each in its own module, each reporting ``null`` and its error if it fails
(the others still run; the exit status is then 1):

- ``nodes`` (:mod:`bench.fleet_nodes`): four ``dwcp node`` processes on loopback,
  ``--vms`` image VMs registered through the API, ``--concurrent`` migrations at once:
  migrations per minute, ledger commit p99, API p99 under that load, node RSS; every
  outcome checked, ledgers agree at the end, no VM at two places;
- ``ledger`` (:mod:`bench.fleet_ledger`): a ledger of ``--ledger-vms`` VMs: checkpoint
  snapshot time and size, restore, and a PBFT state transfer to a replica process that
  was down; and the chunked state transfer of a ledger of ``--chunked-vms`` VMs (100,000:
  a 16 MB snapshot) to an empty replica process;
- ``image`` (:mod:`bench.fleet_image`): a ``--image-gib`` GiB sparse image: HDE index
  time, memory and Python objects, and a transfer's planning per GiB on ``--plan-gib``.

``--smoke`` is a short run (50 VMs, 5 migrations, 2,000 ledger VMs, a 4 GiB image; ``make
test`` runs its parts in ``tests/test_bench_fleet.py``); the defaults are the full run
``make bench`` makes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fleet_image import index_figures, plan_figures
from bench.fleet_ledger import chunked_transfer_figures, snapshot_figures, transfer_figures
from bench.fleet_nodes import FleetFailed, run_nodes
from federation.api.client import ClientError

__all__ = ["register", "run"]

FULL = {"vms": 1000, "concurrent": 100, "ledger_vms": 10_000, "chunked_vms": 100_000,
        "image_gib": 512, "plan_gib": 16}
SMOKE = {"vms": 50, "concurrent": 5, "ledger_vms": 2000, "chunked_vms": 8000, "image_gib": 4,
         "plan_gib": 1}
PHASES = ("nodes", "ledger", "image")


def run(args: argparse.Namespace) -> int:
    sizes = dict(SMOKE if args.smoke else FULL)
    for k in sizes:
        if getattr(args, k) is not None:
            sizes[k] = getattr(args, k)
    out: dict[str, Any] = {"sizes": sizes}
    errors: dict[str, str] = {}
    only = set(args.only or PHASES)

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if name.split(".")[0] not in only:
            return
        try:
            out[name] = fn()
        except (FleetFailed, ClientError, RuntimeError, OSError, ValueError) as exc:
            out[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}"

    with tempfile.TemporaryDirectory(prefix="dwcp-bench-fleet-") as tmp:
        root = Path(tmp)
        (root / "nodes").mkdir()
        phase("nodes", lambda: run_nodes(root / "nodes", sizes["vms"], sizes["concurrent"]))
        phase("ledger.snapshot", lambda: snapshot_figures(sizes["ledger_vms"]))
        phase("ledger.transfer", lambda: transfer_figures(sizes["ledger_vms"]))
        phase("ledger.chunked", lambda: chunked_transfer_figures(sizes["chunked_vms"]))
        phase("image.index", lambda: index_figures(root, sizes["image_gib"]))
        phase("image.plan", lambda: plan_figures(root, sizes["plan_gib"]))
    if errors:
        out["errors"] = errors
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 1 if errors else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("fleet", help="fleet scale: 1,000 VMs and 100 migrations on four "
                                     "nodes, a 10,000-VM ledger, a 512 GiB sparse image")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.add_argument("--smoke", action="store_true",
                   help="a short run (50 VMs, 5 migrations, 2,000 ledger VMs, a 4 GiB "
                        "image); make test runs its parts in tests/test_bench_fleet.py")
    p.add_argument("--only", action="append", choices=PHASES,
                   help="run only this phase (repeatable)")
    p.add_argument("--vms", type=int, help="VMs registered on the nodes (1000)")
    p.add_argument("--concurrent", type=int, help="migrations submitted at once (100)")
    p.add_argument("--ledger-vms", type=int, help="VMs in the ledger phase (10000)")
    p.add_argument("--chunked-vms", type=int,
                   help="VMs in the chunked state transfer's ledger (100000)")
    p.add_argument("--image-gib", type=int, help="the sparse image's size in GiB (512)")
    p.add_argument("--plan-gib", type=int, help="the planned transfer's image in GiB (16)")
    p.set_defaults(func=run)
