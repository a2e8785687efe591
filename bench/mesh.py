"""``dwcp bench mesh``: the mesh control-plane scenarios of issue 4 over a range of seeds.

Runs ``crash-one``, ``link-cut``, ``one-way``, ``partition-heal`` and ``flaky-node``
(sim/scenarios/mesh_scenarios.py) for every seed, in ``--jobs`` processes, and prints
the figures pooled over seeds: detection percentiles over all survivors and seeds,
reroute p99 over both directions of every cut pair, the worst reconvergence,
update-propagation p99.9 and control bandwidth of any run, false positives summed.

Issue 4's acceptance: ``--seeds 1-20`` for crash-one, link-cut, one-way and
partition-heal; 24 simulated hours of flaky-node, pooled over seeds (``hours_total``,
e.g. ``--seeds 1-24 --flaky-hours 1``; ``make chaos`` also runs one 24 h run); and
``--nodes 64 --scenarios crash-one --crash-at 25`` for the N = 64 bounds (issue 4:
detection p99 <= 15 s; issue 18, item 4: control_bps_per_node <= 50,000 and
update_convergence_p999_s <= 5 s; the same with ``--nodes 128`` is reported). The defaults
are shorter so that ``make bench`` stays within minutes. docs/BENCHMARKS.md has the
figures and the exact commands.

``--record FILE`` appends every finished run to FILE (one JSON object a line: the
scenario, seed, DC count and parameters, and the run's result) and does not run again a
run FILE already holds, pooling it into the figures instead: a long sweep (N = 64 seeds
take minutes each on a loaded machine, 24 flaky-node hours an hour or more) stopped at a
deadline resumes where it stopped, and its figures are always those of every run so far.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

from federation.cli.main import CommandError


def _seeds(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise CommandError(f"--seeds: expected A-B or a comma list of integers, got {text!r}") \
            from None


Job = tuple[str, int, int, dict[str, Any]]


def _one(job: Job) -> dict[str, Any]:
    from sim.scenarios.mesh_scenarios import run_mesh

    name, seed, nodes, params = job
    result = run_mesh(name, seed, nodes, **params)
    return {"scenario": name, "seed": seed, "nodes": nodes, "params": params, "ok": result.ok,
            "violations": [v.as_json() for v in result.violations],
            "wall_seconds": result.wall_seconds, "sim_seconds": result.sim_seconds,
            "metrics": result.metrics, "replay": result.replay()}


def _key(job: Job) -> str:
    """What identifies a run in a ``--record`` file: equal keys, the same run and trace."""
    name, seed, nodes, params = job
    return json.dumps([name, seed, nodes, params], sort_keys=True)


def load_record(path: str) -> dict[str, dict[str, Any]]:
    """The runs a ``--record`` file holds, by ``_key`` (a missing file holds none); a
    line that is not such a run is refused naming the file, the line and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        raise CommandError(f"--record {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except OSError as e:
        raise CommandError(f"--record {path}: cannot read: {e.strerror}") from None
    held: dict[str, dict[str, Any]] = {}
    fields = {"scenario": str, "seed": int, "nodes": int, "params": dict, "ok": bool,
              "metrics": dict, "replay": str, "wall_seconds": (int, float)}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--record {path}, line {number}"
        try:
            run = json.loads(line)
        except ValueError as e:
            raise CommandError(f"{where}: not JSON ({e})") from None
        if not isinstance(run, dict):
            raise CommandError(f"{where}: expected a JSON object, got {type(run).__name__}")
        for field, kind in fields.items():
            value = run.get(field)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise CommandError(f"{where}: field {field!r} missing or not "
                                   f"{getattr(kind, '__name__', 'a number')}: {value!r}")
        held[_key((run["scenario"], run["seed"], run["nodes"], run["params"]))] = run
    return held


def _pct(values: list[float], q: float) -> float | None:
    from sim.hosts.mesh_world import percentile

    p = percentile(values, q)
    return None if p is None else round(p, 3)


def _pool(runs: list[dict[str, Any]], key: str) -> list[Any]:
    out: list[Any] = []
    for r in runs:
        value = r["metrics"].get(key)
        if isinstance(value, list):
            out.extend(value)
        elif value is not None:
            out.append(value)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["scenario"], []).append(r)
    out: dict[str, Any] = {}
    inf = float("inf")
    for name, rs in sorted(by.items()):
        fig: dict[str, Any] = {"runs": len(rs), "failed": [r["replay"] for r in rs if not r["ok"]]}
        conv = _pool(rs, "update_convergence_p999_s")
        fig["update_convergence_p999_s_max"] = max(conv) if conv else None
        fig["control_bps_per_node_max"] = max(_pool(rs, "control_bps_per_node"), default=None)
        fig["false_positives"] = sum(_pool(rs, "false_positives"))
        if name == "crash-one":
            det = _pool(rs, "detections")
            fig["detection_p50_s"] = _pct(det, 50)
            fig["detection_p99_s"] = _pct(det, 99)
            fig["undetected"] = sum(_pool(rs, "undetected"))
        elif name == "link-cut":
            times = [inf if x is None else x for x in _pool(rs, "reroutes")]
            fig["reroute_p99_s"] = _pct(times, 99)
        elif name == "one-way":
            times = [inf if x is None else x for x in _pool(rs, "reroute_s")]
            fig["reroute_p99_s"] = _pct(times, 99)
            fig["routes_over_broken_direction"] = sum(_pool(rs, "routes_over_broken_direction"))
            fig["reverse_direction_direct"] = all(_pool(rs, "reverse_direction_direct"))
        elif name == "partition-heal":
            fig["reconverge_s_max"] = max(_pool(rs, "reconverge_s"), default=None)
            fig["route_changes_max_per_pair"] = max(_pool(rs, "route_changes_max_per_pair"),
                                                    default=None)
            fig["routes_on_best_fraction_min"] = min(_pool(rs, "routes_on_best_fraction"),
                                                     default=None)
        elif name == "flaky-node":
            fig["hours_total"] = round(sum(_pool(rs, "hours")), 3)
            fig["suspicions_of_flaky"] = sum(_pool(rs, "suspicions_of_flaky"))
        elif name == "byzantine-gossip":
            fig["lies_sent"] = sum(_pool(rs, "lies_sent"))
            fig["gossip_refused_total"] = sum(_pool(rs, "gossip_refused_total"))
        out[name] = fig
    return out


def run(args: argparse.Namespace) -> int:
    from sim.scenarios.mesh_scenarios import MESH_SCENARIOS

    seeds = _seeds(args.seeds)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for name in names:
        if name not in MESH_SCENARIOS:
            known = ", ".join(MESH_SCENARIOS)
            raise CommandError(f"--scenarios: unknown {name!r} (known: {known})")
    if args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    jobs: list[Job] = []
    for name in names:
        params: dict[str, Any] = {}
        if name == "flaky-node":
            params["duration"] = args.flaky_hours * 3600.0
        if name == "partition-heal" and args.partition_s is not None:
            params["partition_s"] = args.partition_s
        if name == "crash-one" and args.crash_at is not None:
            params["crash_at"] = args.crash_at
            params["faults_until"] = args.crash_at + 30.0
        jobs += [(name, seed, args.nodes, params) for seed in seeds]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if args.record is not None:
        held = load_record(args.record)
        runs = [held[_key(j)] for j in jobs if _key(j) in held]
        jobs = [j for j in jobs if _key(j) not in held]

    def progress(r: dict[str, Any]) -> None:
        runs.append(r)
        if args.record is not None:
            with open(args.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        keep = {k: v for k, v in r["metrics"].items() if k != "detections"}
        print(json.dumps({"scenario": r["scenario"], "seed": r["seed"], "ok": r["ok"],
                          "wall_seconds": round(r["wall_seconds"], 1), "metrics": keep}),
              file=sys.stderr, flush=True)

    if args.jobs == 1:
        for j in jobs:
            progress(_one(j))
    else:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(_one, jobs, chunksize=1):
                progress(r)
    runs.sort(key=lambda r: (r["scenario"], r["seed"]))
    figures = {"nodes": args.nodes, "seeds": args.seeds, "loss": "per scenario (1 %, flaky 5 %)",
               "wall_seconds": round(time.perf_counter() - started, 1),
               "scenarios": summarise(runs)}
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        for name, fig in figures["scenarios"].items():
            print(name, json.dumps(fig, sort_keys=True))
    return 0 if all(r["ok"] for r in runs) else 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mesh", help="mesh control-plane scenarios over a range of seeds")
    p.add_argument("--seeds", default="1-3", help="A-B or a,b,c (default 1-3; issue: 1-20)")
    p.add_argument("--nodes", type=int, default=16, help="DCs per run (default 16)")
    p.add_argument("--scenarios", default=",".join(
        ["crash-one", "link-cut", "one-way", "partition-heal", "flaky-node"]))
    p.add_argument("--flaky-hours", type=float, default=0.5,
                   help="simulated hours of flaky-node per seed (default 0.5; issue: 24)")
    p.add_argument("--partition-s", type=float, default=None,
                   help="partition length of partition-heal (default: the issue's 600 s)")
    p.add_argument("--crash-at", type=float, default=None,
                   help="crash time in crash-one (default 60 s; the run ends 30 s later)")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", metavar="FILE", default=None,
                   help="append every finished run to FILE (JSON lines) and take the "
                        "runs FILE already holds instead of running them again")
    p.set_defaults(func=run)
