"""Messages per executed batch, by type, in the simulator:
``python -m bench.status_traffic [--nodes N] [--latency S] [--per-node K] [--seed X]``.

A :class:`sim.hosts.pbft_cluster.PbftCluster` of N replicas (16) whose links all have a
one-way latency of S seconds (0.15; normal, sd S/10), each correct DC submitting K
commands (20) at random times over 10 s of virtual time, run until every request has
executed everywhere. It prints, per executed sequence number, the messages the replicas
sent by type, and the replicas' ``retransmitted`` and ``status_signed`` counters
(:mod:`consensus.pbft.status`). A slow network stands in for the CPU-bound batches of
``dwcp bench consensus`` at n = 16, which take about a status interval each: that is
where the STATUS traffic (a multicast per replica and interval while busy, and what
peers send again in answer) becomes a large part of all messages. The figures are
counts of a seeded run, so they do not depend on the machine's load (docs/BENCHMARKS.md,
issue 14)."""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from typing import Any

from mesh import wire
from sim.hosts.pbft_cluster import PbftCluster
from sim.network import LinkSpec, Normal

__all__ = ["count"]

#: Virtual seconds over which the DCs submit; the run then goes on until settled.
LOAD_SECONDS = 10.0


def count(nodes: int, latency: float, per_node: int, seed: int) -> dict[str, Any]:
    c = PbftCluster.standalone(seed, n=nodes)
    c.world.default_link = LinkSpec(latency=Normal(latency, latency / 10, latency / 2),
                                    bandwidth=1e9)
    sent: collections.Counter[str] = collections.Counter()

    def on_send(node: str, peer: str, msg: Any) -> None:
        try:
            sent[type(wire.decode(msg.body)).__name__] += 1
        except (AttributeError, wire.WireError):
            sent["other"] += 1

    c.world.on_send(on_send)
    c.workload(0.5, 0.5 + LOAD_SECONDS, per_node, random.Random(seed))
    c.world.run(until=0.5 + LOAD_SECONDS)
    settled = c.world.run(until=0.5 + LOAD_SECONDS + 120.0,
                          predicate=lambda w: c.problem is None and c.settled(w))
    if c.problem is not None or not settled:
        raise RuntimeError(f"the run did not settle: {c.problem or 'requests outstanding'}")
    replicas = [r for m in c.names if (r := c.replica(m)) is not None]
    batches = max(r.last_exec for r in replicas)
    counters = {k: sum(r.metrics.get(k, 0) for r in replicas)
                for k in ("retransmitted", "status_signed")}
    return {
        "nodes": nodes, "latency_s": latency, "per_node": per_node, "seed": seed,
        "batches": batches, "requests": len(c.request_seq),
        "messages_per_batch": round(sum(sent.values()) / batches, 1),
        "by_type_per_batch": {k: round(v / batches, 1) for k, v in sorted(sent.items())},
        "retransmitted_per_batch": round(counters["retransmitted"] / batches, 2),
        "status_signed_per_batch": round(counters["status_signed"] / batches, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.status_traffic")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.15, help="one-way seconds")
    ap.add_argument("--per-node", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    print(json.dumps(count(args.nodes, args.latency, args.per_node, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
