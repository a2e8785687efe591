"""Where a mesh run's control bytes go: bytes sent by message kind over simulated time.

``python -m bench.mesh_bytes --seed 20 --nodes 64 --crash-at 25`` runs crash-one as
``dwcp bench mesh --seeds 20 --nodes 64 --scenarios crash-one --crash-at 25`` does (the
same run, the same trace: the probe only counts what ``World.transmit`` is given and
passes it on) and prints one JSON object: the run's metrics, then per ``--bucket``
seconds of simulated time the kbit/s per DC of every message kind, and the bytes of
each kind sent after the warm-up (what ``control_bps_per_node`` counts).

A kind is the message class, refined where one class carries different loads: a
``Sync`` by who sent it (``ask``: wants a reply; ``answer``) and which of members,
digest and links it carries; a ``Gossip``, ``Ping`` or ``Ack`` by whether it carries
link entries. Found with it: the 92 kbit/s of crash-one N = 64 seed 20 (docs/BENCHMARKS.md,
"Gossip at N = 64 and 128").
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from typing import Any

from mesh import wire
from mesh.gossip.control_msgs import Ack, Gossip, Ping, Sync
from sim.hosts.mesh_world import WARMUP
from sim.world import World


def kind_of(message: Any) -> str:
    """The kind ``message`` is counted under (see the module docstring)."""
    name = type(message).__name__
    if isinstance(message, Sync):
        parts = "".join(p for p, has in (("m", message.members), ("d", message.digest),
                                          ("l", message.links)) if has)
        return f"Sync.{'ask' if message.reply else 'answer'}.{parts or 'empty'}"
    if isinstance(message, (Gossip, Ping, Ack)):
        return f"{name}.links" if message.links else f"{name}.members"
    return name


class ByteCounter:
    """Counts the bytes ``world`` transmits, by (bucket start, kind)."""

    def __init__(self, world: World, bucket: float) -> None:
        if not bucket > 0:
            raise ValueError(f"--bucket must be > 0 seconds, got {bucket}")
        self.bucket = bucket
        self.by_bucket: dict[float, Counter[str]] = defaultdict(Counter)
        self.after_warmup: Counter[str] = Counter()
        inner = world.transmit

        def transmit(src: str, dst: str, raw: bytes, delay: float = 0.0,
                     message: Any = None) -> None:
            decoded = message if message is not None else _decode(raw)
            kind = kind_of(decoded) if decoded is not None else "undecodable"
            start = int(world.now // bucket) * bucket
            self.by_bucket[start][kind] += len(raw)
            if world.now >= WARMUP:
                self.after_warmup[kind] += len(raw)
            inner(src, dst, raw, delay, message)

        world.transmit = transmit  # type: ignore[method-assign]

    def table(self, nodes: int) -> list[dict[str, Any]]:
        out = []
        for start in sorted(self.by_bucket):
            row = self.by_bucket[start]
            kbps = {k: round(v * 8 / self.bucket / nodes / 1000, 2)
                    for k, v in sorted(row.items())}
            out.append({"t": start, "total_kbps_per_dc": round(sum(kbps.values()), 2),
                        "kbps_per_dc": kbps})
        return out


def _decode(raw: bytes) -> Any:
    try:
        return wire.decode(raw)
    except wire.WireError:
        return None


def main(argv: list[str] | None = None) -> int:
    from sim.scenarios.mesh_scenarios import run_mesh

    ap = argparse.ArgumentParser(prog="python -m bench.mesh_bytes")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--crash-at", type=float, default=25.0,
                    help="as dwcp bench mesh --crash-at (faults end 30 s later)")
    ap.add_argument("--bucket", type=float, default=5.0, help="seconds per row (default 5)")
    args = ap.parse_args(argv)
    if args.nodes < 4:
        ap.error(f"--nodes: crash-one needs at least 4 DCs, got {args.nodes}")
    if not args.bucket > 0:
        ap.error(f"--bucket must be > 0 seconds, got {args.bucket}")
    counters: list[ByteCounter] = []
    result = run_mesh("crash-one", args.seed, args.nodes,
                      observe=lambda w: counters.append(ByteCounter(w, args.bucket)),
                      crash_at=args.crash_at, faults_until=args.crash_at + 30.0)
    (counter,) = counters
    metrics = {k: v for k, v in result.metrics.items() if k != "detections"}
    print(json.dumps({"seed": args.seed, "nodes": args.nodes, "ok": result.ok,
                      "trace_hash": result.trace_hash, "metrics": metrics,
                      "after_warmup_bytes": dict(counter.after_warmup.most_common()),
                      "buckets": counter.table(args.nodes)}, sort_keys=True))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
