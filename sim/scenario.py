'''Scenarios: topology + workload + fault schedule + checkers + a quiet phase.

Writing one
-----------
Put a module in ``sim/scenarios/`` (e.g. ``sim/scenarios/mesh_gossip.py``), add one
``from sim.scenarios import mesh_gossip  # noqa: F401`` line to
``sim/scenarios/__init__.py``, and register a function::

    from sim.scenario import Run, scenario

    @scenario("gossip-halves", nodes=8, faults_until=60.0, quiet=60.0,
              swarm_kinds=BENIGN_KINDS, description="gossip converges after a split")
    def gossip_halves(run: Run) -> None:
        world = run.world                        # a fresh World(seed)
        names = run.names()                      # ["n00", ..., "n07"] (run.nodes of them)
        for name in names:
            world.add_node(name, build)          # see sim.world for build(node)
        world.set_links(geo_links(names))        # optional, sim/geo.py
        run.nemesis.partition(partitions.halves(names, run.rng), at=10.0, until=40.0)
        world.at(5.0, lambda w: w.invoke("n00", "gossip", lambda c, now: c.join(now), "join"),
                 "join n00")
        run.add_checker("one-owner", check_fn)   # fn(world) -> str | None, after every event
        run.liveness("all members alive everywhere", lambda w: ...)   # quiet phase goal
        run.metric("rounds", lambda w: ...)      # extra figure in the JSON summary
        loss = run.param("loss", 0.01)           # `--param loss=0.05` overrides it

Parameters (``run.param(key, default)``) come from ``dwcp sim run/sweep --param KEY=VALUE``
(VALUE is JSON, or else a string) or ``run_scenario(..., params={...})``; a failure's
replay command repeats them. A scenario may set ``run.faults_until`` / ``run.quiet``
from a parameter inside its function.

A run (:func:`run_scenario`) builds the world, adds a random mix of faults of
``swarm_kinds`` if ``--swarm`` is on, runs the fault phase to ``faults_until``
(checkers after every event; the first violation stops the run with the event that
broke it), heals every fault the nemesis made (``Nemesis.heal_all``: partitions lift,
crashed nodes restart, clocks reset, Byzantine nodes turn honest), then runs the
quiet phase: every liveness predicate must hold within ``quiet`` seconds (checked
every ``LIVENESS_STEP`` of virtual time), or the run fails with a liveness violation.
Faults a scenario schedules itself after ``faults_until`` are its own business.
'''

from __future__ import annotations

import json
import random
import shlex
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs

from mesh.links.modes import ModeLimits
from sim.federation_profile import FederationProfile, load_profile, node_count
from sim.nemesis import BENIGN_KINDS, Nemesis
from sim.world import SimError, Violation, WallClockExceeded, World

__all__ = ["scenario", "Run", "ScenarioSpec", "RunResult", "run_scenario", "registry",
           "replay_command", "LIVENESS_STEP"]

#: Virtual seconds between two liveness checks in the quiet phase: fine enough for
#: bounds of tens of seconds, cheap enough that a 16-node run is not slowed by it.
LIVENESS_STEP = 0.1

#: The JSON summary lists at most this many nemesis actions (a 24-hour run may make
#: tens of thousands); ``metrics.nemesis_actions`` counts them all.
NEMESIS_LOG_SHOWN = 200

registry: dict[str, ScenarioSpec] = {}


@attrs.frozen
class ScenarioSpec:
    name: str
    build: Callable[[Run], None]
    nodes: int
    faults_until: float
    quiet: float
    swarm_kinds: tuple[str, ...]
    description: str
    min_nodes: int


def scenario(name: str, *, nodes: int, faults_until: float, quiet: float,
             swarm_kinds: tuple[str, ...] = BENIGN_KINDS, description: str = "",
             min_nodes: int = 2) -> Callable[[Callable[[Run], None]], Callable[[Run], None]]:
    """Register a scenario under ``name`` (see the module docstring)."""

    def register(build: Callable[[Run], None]) -> Callable[[Run], None]:
        if name in registry and registry[name].build.__qualname__ != build.__qualname__:
            raise ValueError(f"scenario {name!r} is already registered")
        doc = description or (build.__doc__ or "").strip().split("\n")[0]
        registry[name] = ScenarioSpec(name, build, nodes, faults_until, quiet,
                                      tuple(swarm_kinds), doc, min_nodes)
        return build

    return register


class Run:
    """What a scenario function gets: the world, its parameters, the nemesis."""

    def __init__(self, spec: ScenarioSpec, seed: int, nodes: int, swarm: bool,
                 params: dict[str, Any] | None = None,
                 federation: FederationProfile | None = None) -> None:
        self.spec = spec
        #: the operator's federation file (``--federation``): DC names, regions, [modes]
        self.federation = federation
        self.seed = seed
        self.nodes = nodes
        self.swarm = swarm
        #: overrides given with ``--param KEY=VALUE`` (durations, rates); read with param()
        self.params: dict[str, Any] = dict(params or {})
        self.world = World(seed)
        self.nemesis = Nemesis(self.world)
        #: randomness for the scenario's own choices (topology, workload)
        self.rng: random.Random = self.world.rng("scenario")
        self.faults_until = spec.faults_until
        self.quiet = spec.quiet
        self.goals: list[tuple[str, Callable[[World], bool]]] = []
        self.metrics: dict[str, Callable[[World], Any]] = {}

    def param(self, key: str, default: Any) -> Any:
        """A scenario parameter: the ``--param`` override if given, else ``default``."""
        return self.params.get(key, default)

    def names(self) -> list[str]:
        if self.federation is not None:
            return list(self.federation.names)
        width = max(2, len(str(self.nodes - 1)))
        return [f"n{i:0{width}d}" for i in range(self.nodes)]

    def regions(self) -> dict[str, str] | None:
        """The federation file's DC regions on the geo preset, or None (the scenario's
        own placement: ``geo.assign_regions`` or its own draw)."""
        return dict(self.federation.regions) if self.federation is not None else None

    def mode_limits(self) -> ModeLimits:
        """The ``[modes]`` thresholds of the federation file, else the defaults."""
        return self.federation.modes if self.federation is not None else ModeLimits()

    def add_checker(self, name: str, check: Callable[[World], str | None]) -> None:
        self.world.add_checker(name, check)

    def liveness(self, what: str, holds: Callable[[World], bool]) -> None:
        self.goals.append((what, holds))

    def metric(self, name: str, value: Callable[[World], Any]) -> None:
        self.metrics[name] = value


@attrs.define
class RunResult:
    scenario: str
    seed: int
    nodes: int
    swarm: bool
    ok: bool
    violations: list[Violation]
    trace_hash: str
    sim_seconds: float
    wall_seconds: float
    events: int
    metrics: dict[str, Any]
    faults: list[str]
    params: dict[str, Any] = attrs.field(factory=dict)
    federation: str | None = None

    def replay(self) -> str:
        return replay_command(self.scenario, self.seed, self.nodes, self.swarm, self.params,
                              self.federation)

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "seed": self.seed, "nodes": self.nodes,
            "swarm": self.swarm, "ok": self.ok,
            "violations": [v.as_json() for v in self.violations],
            "trace_hash": self.trace_hash, "sim_seconds": round(self.sim_seconds, 6),
            "wall_seconds": round(self.wall_seconds, 3), "events": self.events,
            "metrics": self.metrics, "faults": self.faults, "params": self.params,
            "federation": self.federation, "replay": self.replay(),
        }


def replay_command(name: str, seed: int, nodes: int, swarm: bool,
                   params: dict[str, Any] | None = None, federation: str | None = None) -> str:
    command = f"dwcp sim run {name} --seed {seed}"
    command += (f" --federation {shlex.quote(federation)}" if federation is not None
                else f" --nodes {nodes}")
    command += " --swarm" if swarm else ""
    for key, value in sorted((params or {}).items()):
        command += f" --param {shlex.quote(f'{key}={json.dumps(value)}')}"
    return command


def run_scenario(name: str, seed: int, nodes: int | None = None, swarm: bool = False,
                 trace: Callable[[str], None] | None = None,
                 params: dict[str, Any] | None = None,
                 horizon: float | None = None, federation: str | None = None,
                 wall_limit: float | None = None) -> RunResult:
    """Run scenario ``name`` with ``seed``. ``params`` are the scenario's overrides;
    ``federation`` is the path of an operator's federation file whose DCs (names, so
    their number; regions; ``[modes]``) replace the scenario's ``n00 …`` nodes;
    ``horizon`` (for tests) ends both phases by that virtual time, whatever the scenario
    asks for: a run cut short is still deterministic, but its liveness verdict is not
    meaningful. ``wall_limit``: seconds of wall-clock time after which the run fails
    with a ``wall-clock`` violation (a sweep's guard against a run that never ends)."""
    spec = registry.get(name)
    if spec is None and not registry:
        raise KeyError("no scenario is registered: run scenarios through sim.scenarios (the "
                       "catalogue imports every scenario module)")
    if spec is None:
        raise KeyError(f"no scenario named {name!r}; `dwcp sim list` shows them")
    profile = load_profile(federation) if federation is not None else None
    count = spec.nodes if nodes is None else nodes
    if profile is not None:
        count = node_count(profile, nodes)
    if count < spec.min_nodes:
        raise ValueError(f"scenario {name} needs at least {spec.min_nodes} nodes, got {count}")
    started = time.perf_counter()
    run = Run(spec, seed, count, swarm, params, profile)
    world = run.world
    world.trace_to(trace)
    if wall_limit is not None:
        world.wall_deadline = time.monotonic() + wall_limit
    faults: list[str] = []
    violations: list[Violation] = []
    try:
        spec.build(run)
        if horizon is not None:
            run.faults_until = min(run.faults_until, horizon)
            run.quiet = max(0.0, min(run.quiet, horizon - run.faults_until))
        if swarm:
            faults = run.nemesis.swarm(run.names(), run.faults_until, spec.swarm_kinds)
        world.run(until=run.faults_until)
        if world.violation is None:
            run.nemesis.heal_all()
            _quiet_phase(run)
    except WallClockExceeded as exc:
        violations.append(Violation(world.now, "wall-clock", str(exc), world.describe_event()))
    except SimError as exc:
        violations.append(Violation(world.now, "exception", str(exc), world.describe_event()))
    except Exception as exc:  # a bug in the scenario or a checker: still a replayable failure
        where = traceback.extract_tb(exc.__traceback__)[-1]
        message = f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"[:1000]
        violations.append(Violation(world.now, "exception", message, world.describe_event()))
    if world.violation is not None:
        violations.append(world.violation)
    metrics: dict[str, Any] = dict(world.metrics)
    metrics["events"] = world.events
    metrics["notifications"] = len(world.notifications)
    metrics["nemesis_actions"] = len(run.nemesis.log)
    metrics["nemesis"] = [f"{t:.3f} {what}" for t, what in run.nemesis.log[:NEMESIS_LOG_SHOWN]]
    for key, value in run.metrics.items():
        try:
            metrics[key] = value(world)
        except Exception as exc:  # a broken metric must not hide the run's verdict
            metrics[key] = f"metric failed: {type(exc).__name__}: {exc}"[:300]
    return RunResult(name, seed, count, swarm, not violations, violations, world.trace_hash(),
                     world.now, time.perf_counter() - started, world.events, metrics, faults,
                     dict(run.params), federation)


def _quiet_phase(run: Run) -> None:
    world = run.world
    deadline = run.faults_until + run.quiet
    pending = list(run.goals)
    converged_at = world.now
    while True:
        pending = [(what, holds) for what, holds in pending if not holds(world)]
        if not pending or world.violation is not None:
            break
        if world.now >= deadline:
            what = "; ".join(w for w, _ in pending)
            world.violation = Violation(world.now, "liveness",
                                        f"not reached within {run.quiet:g} s of quiet: {what}",
                                        world.describe_event())
            return
        world.run(until=min(world.now + LIVENESS_STEP, deadline))
        converged_at = world.now
    after = round(converged_at - run.faults_until, 6)
    run.metrics.setdefault("converged_after", lambda _world: after)
