"""``dwcp sim``: list, run and sweep simulator scenarios.

* ``dwcp sim list``
* ``dwcp sim run NAME --seed N [--nodes N] [--swarm] [--json] [--trace FILE] [--param K=V]``
* ``dwcp sim sweep NAME --seeds A-B [--jobs J] [--nodes N] [--swarm] [--json] [--param K=V]``

Every failed run prints the ``dwcp sim run`` command that replays it exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from federation.cli.main import CommandError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sim", help="run the deterministic simulator")
    ssub = p.add_subparsers(dest="sim_command", required=True, metavar="ACTION")

    ls = ssub.add_parser("list", help="list the registered scenarios")
    ls.set_defaults(func=_list)

    run = ssub.add_parser("run", help="run one scenario with one seed")
    run.add_argument("name")
    run.add_argument("--seed", type=int, required=True)
    run.add_argument("--nodes", type=int, default=None, help="override the scenario's size")
    run.add_argument("--federation", metavar="FILE", default=None,
                     help="use the DCs of this federation file (names, regions, [modes])")
    run.add_argument("--swarm", action="store_true", help="add a random mix of faults")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--trace", metavar="FILE", help="write every delivered event to FILE")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a scenario parameter (VALUE is JSON, or else a string)")
    run.set_defaults(func=_run)

    sweep = ssub.add_parser("sweep", help="run one scenario over a range of seeds")
    sweep.add_argument("name")
    sweep.add_argument("--seeds", required=True, metavar="A-B", help="inclusive range, or N")
    sweep.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    sweep.add_argument("--nodes", type=int, default=None)
    sweep.add_argument("--federation", metavar="FILE", default=None,
                       help="use the DCs of this federation file (names, regions, [modes])")
    sweep.add_argument("--swarm", action="store_true")
    sweep.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    sweep.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    # No bound by default: runs differ by four orders of magnitude (a PBFT run ~0.2 s,
    # a 24-hour flaky-node run 35 min on the 2-core test machine).
    sweep.add_argument("--run-timeout", type=float, default=0.0, metavar="SECONDS",
                       help="a run still going after this much wall-clock time fails as "
                            "wall-clock and the sweep goes on (default 0: no bound)")
    sweep.set_defaults(func=_sweep)


def _registry() -> dict[str, Any]:
    import sim.scenarios  # noqa: F401
    from sim.scenarios import registry

    return registry


def _spec(name: str) -> Any:
    registry = _registry()
    if name not in registry:
        raise CommandError(f"no scenario named {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def _check_nodes(spec: Any, nodes: int | None, federation: str | None = None) -> None:
    if federation is not None:
        from sim.federation_profile import ProfileError, load_profile, node_count

        try:
            count = node_count(load_profile(federation), nodes)
        except ProfileError as exc:
            raise CommandError(str(exc)) from None
        if count < spec.min_nodes:
            raise CommandError(f"--federation {federation}: scenario {spec.name} needs at "
                               f"least {spec.min_nodes} DCs, the file has {count}")
        return
    if nodes is not None and nodes < spec.min_nodes:
        raise CommandError(f"--nodes {nodes}: scenario {spec.name} needs at least "
                           f"{spec.min_nodes} nodes")


def _params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


def _list(args: argparse.Namespace) -> int:
    registry = _registry()
    width = max((len(n) for n in registry), default=0)
    for name in sorted(registry):
        spec = registry[name]
        print(f"{name:<{width}}  {spec.nodes:>3} nodes  faults {spec.faults_until:g} s  "
              f"quiet {spec.quiet:g} s  {spec.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from sim.scenarios import run_scenario

    spec = _spec(args.name)
    _check_nodes(spec, args.nodes, args.federation)
    sink = None
    trace_file = None
    if args.trace:
        try:
            trace_file = open(args.trace, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"--trace {args.trace}: {exc.strerror}") from None
        write = trace_file.write

        def sink(line: str) -> None:
            write(line + "\n")

    try:
        result = run_scenario(args.name, args.seed, args.nodes, args.swarm, trace=sink,
                              params=_params(args.param), federation=args.federation)
    finally:
        if trace_file is not None:
            trace_file.close()
    if args.json:
        print(json.dumps(result.as_json(), sort_keys=True, default=repr))
    else:
        status = "ok" if result.ok else "FAILED"
        print(f"{result.scenario} seed={result.seed} nodes={result.nodes}"
              f"{' swarm' if result.swarm else ''}: {status}  trace={result.trace_hash}  "
              f"sim={result.sim_seconds:.1f}s wall={result.wall_seconds:.2f}s "
              f"events={result.events}")
        for fault in result.faults:
            print(f"  fault: {fault}")
        for v in result.violations:
            print(f"  violation [{v.checker}] at t={v.time:.6f}: {v.message}")
            print(f"    event: {v.event}")
        if not result.ok:
            print(f"  replay: {result.replay()}")
    return 0 if result.ok else 1


def _parse_seeds(text: str) -> range:
    try:
        if "-" in text:
            low, high = text.split("-", 1)
            seeds = range(int(low), int(high) + 1)
        else:
            seeds = range(int(text), int(text) + 1)
    except ValueError:
        raise CommandError(f"--seeds {text!r}: expected A-B (inclusive) or one seed") from None
    if not seeds:
        raise CommandError(f"--seeds {text!r}: the range is empty")
    return seeds


def _one(name: str, seed: int, nodes: int | None, swarm: bool,
         params: dict[str, Any], federation: str | None = None,
         wall_limit: float | None = None) -> dict[str, Any]:
    from sim.scenarios import run_scenario

    result = run_scenario(name, seed, nodes, swarm, params=params, federation=federation,
                          wall_limit=wall_limit)
    return {"seed": seed, "ok": result.ok, "trace_hash": result.trace_hash,
            "events": result.events, "wall_seconds": result.wall_seconds,
            "violations": [v.as_json() for v in result.violations],
            "replay": result.replay()}


def _sweep(args: argparse.Namespace) -> int:
    spec = _spec(args.name)
    _check_nodes(spec, args.nodes, args.federation)
    seeds = _parse_seeds(args.seeds)
    params = _params(args.param)
    if args.jobs < 1:
        raise CommandError(f"--jobs {args.jobs}: must be at least 1")
    if not args.run_timeout >= 0:  # also refuses nan
        raise CommandError(f"--run-timeout {args.run_timeout}: must be 0 (no bound) or more")
    wall_limit = args.run_timeout or None
    started = time.perf_counter()
    failures: list[dict[str, Any]] = []
    events = 0
    done = 0
    tty = sys.stderr.isatty()
    step = max(1, len(seeds) // 10)
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(seeds))) as pool:
        futures = [pool.submit(_one, args.name, s, args.nodes, args.swarm, params,
                               args.federation, wall_limit) for s in seeds]
        for future in as_completed(futures):
            outcome = future.result()
            done += 1
            events += outcome["events"]
            if not outcome["ok"]:
                failures.append(outcome)
                first = outcome["violations"][0]
                print(f"FAIL seed {outcome['seed']}: [{first['checker']}] at "
                      f"t={first['time']:.6f}: {first['message']}", flush=True)
                print(f"  replay: {outcome['replay']}", flush=True)
            if tty or done % step == 0 or done == len(seeds):
                elapsed = time.perf_counter() - started
                line = (f"sweep {args.name}: {done}/{len(seeds)} runs, {len(failures)} failed, "
                        f"{elapsed:.1f}s")
                print(("\r" + line) if tty else line, end="" if tty else "\n",
                      file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    wall = time.perf_counter() - started
    if args.json:
        print(json.dumps({"scenario": args.name, "seeds": [seeds[0], seeds[-1]],
                          "runs": len(seeds), "failed": len(failures),
                          "failures": sorted(failures, key=lambda f: f["seed"]),
                          "wall_seconds": round(wall, 3), "events": events}, sort_keys=True))
    else:
        print(f"{args.name}: {len(seeds)} runs, {len(failures)} failed, {wall:.1f}s, "
              f"{events / wall:,.0f} events/s")
    return 1 if failures else 0
