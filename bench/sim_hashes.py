"""Trace hashes of the simulator's safety sweeps, to prove a speedup changed nothing.

``python -m bench.sim_hashes --out FILE [--jobs J]`` runs the sweep families below
(pbft-crashpoints and pbft-swarm at n = 4 and n = 7, seeds 0-199; migration-chaos,
seeds 1-100) and writes every (family, nodes, seed) -> trace hash, with the CPU seconds
of each run, as JSON. ``--compare FILE`` runs them again and exits 1 (listing the
seeds) if any hash differs from FILE's. ``--only NAME`` limits the run to one family;
``--seeds A-B`` narrows the seed ranges.

The trace hash is a hash of every delivered event of a run (``sim.world``): if a change
keeps every hash of these 900 runs, it changed no run's behaviour on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# (family, nodes or None for the scenario's own size, first seed, last seed)
FAMILIES: list[tuple[str, int | None, int, int]] = [
    ("pbft-crashpoints", 4, 0, 199),
    ("pbft-crashpoints", 7, 0, 199),
    ("pbft-swarm", 4, 0, 199),
    ("pbft-swarm", 7, 0, 199),
    ("migration-chaos", None, 1, 100),
]


def _one(name: str, nodes: int | None, seed: int) -> tuple[str, str, float, bool]:
    from sim.scenarios import run_scenario

    cpu = time.process_time()
    result = run_scenario(name, seed, nodes)
    return (f"{name} n={nodes or 'default'} seed={seed}", result.trace_hash,
            time.process_time() - cpu, result.ok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_hashes")
    ap.add_argument("--out", help="write the hashes and CPU seconds here (JSON)")
    ap.add_argument("--compare", help="a file written by --out: every hash must match")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--only", help="one family name")
    ap.add_argument("--nodes", type=int, default=None, help="with --only: one size")
    ap.add_argument("--seeds", help="A-B: narrow every family's seed range to this")
    args = ap.parse_args(argv)
    runs: list[tuple[str, int | None, int]] = []
    for name, nodes, low, high in FAMILIES:
        if args.only and name != args.only:
            continue
        if args.nodes is not None and nodes != args.nodes:
            continue
        if args.seeds:
            a, _, b = args.seeds.partition("-")
            low, high = max(low, int(a)), min(high, int(b or a))
        runs.extend((name, nodes, s) for s in range(low, high + 1))
    hashes: dict[str, str] = {}
    cpu: dict[str, float] = {}
    failed: list[str] = []
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for key, trace_hash, seconds, ok in pool.map(_one, *zip(*runs, strict=True),
                                                       chunksize=4):
            hashes[key] = trace_hash
            family = key.rsplit(" seed=", 1)[0]
            cpu[family] = cpu.get(family, 0.0) + seconds
            if not ok:
                failed.append(key)
    wall = time.perf_counter() - started
    counts: dict[str, int] = {}
    for key in hashes:
        family = key.rsplit(" seed=", 1)[0]
        counts[family] = counts.get(family, 0) + 1
    for family, seconds in cpu.items():
        print(f"{family}: {counts[family]} runs, {seconds:.1f} s CPU, "
              f"{seconds / counts[family]:.3f} s CPU/seed")
    print(f"wall {wall:.1f} s, {len(failed)} runs not ok: {failed[:10]}")
    if args.out:
        doc: dict[str, Any] = {"hashes": hashes, "cpu_seconds": cpu, "runs": counts,
                               "failed": failed}
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare, encoding="utf-8") as fh:
            want = json.load(fh)["hashes"]
        diff = [k for k in hashes if k in want and want[k] != hashes[k]]
        missing = [k for k in hashes if k not in want]
        print(f"compared {len(hashes) - len(missing)} runs with {args.compare}: "
              f"{len(diff)} differ, {len(missing)} not in the file")
        for k in diff[:20]:
            print(f"  DIFFERS {k}: {want[k]} -> {hashes[k]}")
        if diff:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
