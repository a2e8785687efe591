"""Scenarios of the mesh control plane (issue 4): failure detection, false positives,
reroutes, partitions and one-way links, on the geo matrix.

Each registered scenario reads optional overrides from ``run.params`` (a dict the
bench and the tests set through :func:`run_mesh`), so a smoke test can run the same
code with a shorter schedule; ``dwcp sim run NAME`` uses the defaults of the issue.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mesh import wire
from mesh.gossip.control_msgs import Gossip, LinkEntry, MemberUpdate, Signed
from sim import partitions
from sim.hosts.mesh_world import WARMUP, MeshWorld, percentile
from sim.scenario import Run, RunResult, _quiet_phase, registry, scenario
from sim.world import NotifyRecord, SimError, Violation, World

__all__ = ["run_mesh", "MESH_SCENARIOS"]

MESH_SCENARIOS = ("crash-one", "flaky-node", "link-cut", "partition-heal", "one-way",
                  "byzantine-gossip")


def _param(run: Run, key: str, default: Any) -> Any:
    params: dict[str, Any] = getattr(run, "params", {})
    return params.get(key, default)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# --------------------------------------------------------------------------- crash-one


@scenario("crash-one", nodes=16, faults_until=150.0, quiet=90.0, min_nodes=4,
          description="one DC crashes on the lossy geo matrix: detection time by survivors")
def crash_one(run: Run) -> None:
    run.faults_until = _param(run, "faults_until", run.faults_until)
    mw = MeshWorld(run, loss=_param(run, "loss", 0.01))
    crash_at = _param(run, "crash_at", 60.0) + run.rng.random()
    victim = run.rng.choice(mw.names)
    run.nemesis.crash(victim, at=crash_at)  # restarted by heal_all: it must rejoin
    survivors = [n for n in mw.names if n != victim]

    def detections(world: World) -> list[float]:
        seen = mw.first_death(victim, crash_at)
        return sorted(round(seen[n] - crash_at, 3) for n in survivors if n in seen)

    run.metric("victim", lambda w: victim)
    run.metric("detections", detections)
    run.metric("undetected", lambda w: len(survivors) - len(detections(w)))
    run.metric("detection_p50_s", lambda w: _r(percentile(detections(w), 50)))
    run.metric("detection_p99_s", lambda w: _r(percentile(detections(w), 99)))


# --------------------------------------------------------------------------- flaky-node

#: Issue 4: the flaky DC stalls 2 s every 60 s. A stall is modelled as clogging every
#: link of the node both ways: nothing it sends leaves and nothing reaches it for 2 s,
#: then the held frames flow (a process paused by GC or a VM freeze).
STALL_S = 2.0
STALL_EVERY_S = 60.0


@scenario("flaky-node", nodes=16, faults_until=24 * 3600.0, quiet=60.0, min_nodes=4,
          description="5% loss, one DC stalls 2 s every 60 s for 24 h: false positives")
def flaky_node(run: Run) -> None:
    run.faults_until = _param(run, "duration", run.faults_until)
    mw = MeshWorld(run, loss=_param(run, "loss", 0.05))
    flaky = run.rng.choice(mw.names)
    t = WARMUP + run.rng.uniform(0, STALL_EVERY_S)
    stalls = 0
    while t + STALL_S < run.faults_until:
        for other in mw.names:
            if other != flaky:
                run.nemesis.clog(flaky, other, at=t, until=t + STALL_S)
        stalls += 1
        t += STALL_EVERY_S
    suspicions = [0]

    def count(r: NotifyRecord) -> None:
        if r.kind == "member" and r.detail["name"] == flaky and r.detail["state"] == "suspect":
            suspicions[0] += 1

    run.world.on_notify(count)
    run.add_checker("no-false-death", lambda w: (
        f"a live DC was declared dead ({mw.false_positives} times)" if mw.false_positives
        else None))
    run.metric("flaky", lambda w: flaky)
    run.metric("stalls", lambda w: stalls)
    run.metric("suspicions_of_flaky", lambda w: suspicions[0])
    run.metric("hours", lambda w: round(run.faults_until / 3600, 3))


# --------------------------------------------------------------------------- link-cut


def _reroute_time(mw: MeshWorld, a: str, b: str, since: float) -> float | None:
    """When both a's control and bulk routes to b left the direct link after ``since``."""
    times = []
    for kind in ("control", "bulk"):
        log = mw.route_log.get((a, kind, b), [])
        # On the geo matrix a detour is often better than the direct link already (the
        # triangle inequality does not hold between regions): then the cut costs nothing.
        before = [hops for t, hops in log if t < since]
        if before and before[-1] is not None and len(before[-1]) == 3:
            times.append(0.0)
            continue
        hit = next((t for t, hops in log if t >= since and hops is not None and len(hops) == 3),
                   None)
        if hit is None:
            return None
        times.append(hit - since)
    return max(times)


@scenario("link-cut", nodes=16, faults_until=150.0, quiet=60.0, min_nodes=4,
          description="the direct link of a pair is cut both ways: time to reroute")
def link_cut(run: Run) -> None:
    run.faults_until = _param(run, "faults_until", run.faults_until)
    mw = MeshWorld(run, loss=_param(run, "loss", 0.01))
    mw.is_false_positive = lambda r: run.world.nodes[r.detail["name"]].up  # type: ignore
    a, b = run.rng.sample(mw.names, 2)
    cut_at = _param(run, "cut_at", 60.0) + run.rng.random()
    run.nemesis.partition(partitions.cut(a, b), at=cut_at, label=f"cut {a}-{b}")

    def reroutes(world: World) -> list[float | None]:
        return [_r(_reroute_time(mw, a, b, cut_at)), _r(_reroute_time(mw, b, a, cut_at))]

    run.metric("pair", lambda w: [a, b])
    run.metric("reroutes", reroutes)
    run.metric("reroute_p99_s", lambda w: _r(percentile(
        [x if x is not None else float("inf") for x in reroutes(w)], 99)))


# --------------------------------------------------------------------------- partition-heal


@scenario("partition-heal", nodes=16, faults_until=60.0 + 600.0 + 120.0, quiet=60.0,
          min_nodes=4, description="halves for 10 minutes, then healed: reconvergence")
def partition_heal(run: Run) -> None:
    mw = MeshWorld(run, loss=_param(run, "loss", 0.01))
    start = _param(run, "partition_at", 60.0)
    heal = start + _param(run, "partition_s", 600.0)
    run.faults_until = heal + _param(run, "after_heal_s", 120.0)
    run.nemesis.partition(partitions.halves(mw.names, run.rng), at=start, until=heal,
                          label="halves")
    before: dict[str, Any] = {}
    run.world.at(start - 0.001, lambda w: before.update(routes=mw.routes_now()),
                 "remember routes")
    # Updates made while half the mesh cannot hear them are not convergence figures.
    run.world.at(start, lambda w: setattr(mw, "measuring", False), "stop measuring")
    run.world.at(heal + 30.0, lambda w: setattr(mw, "measuring", True), "measure again")

    def changes_after_heal(world: World) -> dict[tuple[str, str, str], list[float]]:
        return {key: [t for t, _ in log if t >= heal] for key, log in mw.route_log.items()}

    def reconverge(world: World) -> float | None:
        ch = [t for ts in changes_after_heal(world).values() for t in ts]
        alive = [t for t, _, _, state in mw.member_events if t >= heal and state == "alive"]
        last = max(ch + alive, default=None)
        return None if last is None else round(last - heal, 3)

    def restored(world: World) -> float:
        now = mw.routes_now()
        old = before.get("routes", {})
        same = sum(1 for k, v in now.items() if old.get(k) == v)
        return round(same / max(1, len(now)), 4)

    run.metric("reconverge_s", reconverge)
    run.metric("route_changes_max_per_pair", lambda w: max(
        (len(ts) for ts in changes_after_heal(w).values()), default=0))
    run.metric("routes_restored_fraction", restored)


# --------------------------------------------------------------------------- one-way


@scenario("one-way", nodes=16, faults_until=150.0, quiet=60.0, min_nodes=4,
          description="one direction of a link drops everything: no false deaths, "
                      "routes avoid that direction")
def one_way(run: Run) -> None:
    run.faults_until = _param(run, "faults_until", run.faults_until)
    mw = MeshWorld(run, loss=_param(run, "loss", 0.01))
    mw.is_false_positive = lambda r: run.world.nodes[r.detail["name"]].up  # type: ignore
    a, b = run.rng.sample(mw.names, 2)
    cut_at = _param(run, "cut_at", 60.0) + run.rng.random()
    run.nemesis.partition(partitions.cut(a, b, both=False), at=cut_at, label=f"one-way {a}->{b}")

    def users_of_broken(world: World) -> int:
        """Routes (anyone's) that send over a -> b at the end of the run."""
        count = 0
        for hops in mw.routes_now().values():
            if hops is not None and any(hops[i:i + 2] == (a, b) for i in range(len(hops) - 1)):
                count += 1
        return count

    def reverse_direct(world: World) -> bool:
        route = mw.core(b).route("control", a)
        return route is not None and route.hops == (b, a)

    run.metric("pair", lambda w: [a, b])
    run.metric("reroute_s", lambda w: _r(_reroute_time(mw, a, b, cut_at)))
    run.metric("routes_over_broken_direction", users_of_broken)
    run.metric("reverse_direction_direct", reverse_direct)


# --------------------------------------------------------------------------- byzantine-gossip

#: The top of a U64 (issue 15: one forged update at 2**64-1 buried a DC for good).
_TOP = 2**64 - 1
#: Statements in each of the liar's volleys (:func:`_lies`), and the volley interval.
LIES_PER_VOLLEY = 7
LIE_EVERY_S = 1.0


def _lies(mw: MeshWorld, liar: str, victim: str, other: str, seq: int) -> list[Signed]:
    """What one insider ``liar`` (a DC with a valid key) says about others: each is
    signed with the liar's own key, whoever it claims to speak for."""
    key = mw.identities[liar]

    def sign(statement: MemberUpdate | LinkEntry) -> Signed:
        context = b"dwcp/1 link statement\x00" if isinstance(statement, LinkEntry) else (
            b"dwcp/1 member statement\x00")
        body = wire.encode_struct(statement)
        return Signed(body, key.sign(context + body))

    dead, alive, left = 2, 0, 3
    return [
        sign(MemberUpdate(victim, _TOP, dead, liar)),  # an accusation at the top
        sign(MemberUpdate(victim, seq, left, victim)),  # the victim's own word, forged
        sign(MemberUpdate(victim, seq, dead, other)),  # another DC's accusation, forged
        sign(MemberUpdate(liar, _TOP, alive, liar)),  # its own incarnation at the top
        sign(LinkEntry(victim, other, _TOP, 1e6, 0.0, 0.0, 1.0, True, None)),  # not its link
        sign(LinkEntry(other, victim, seq, 1e6, 0.0, 0.0, 1.0, True, None)),  # nor this one
        sign(LinkEntry(liar, victim, _TOP, 0.1, 0.0, 0.0, 0.0, False, 1e5)),  # its own, at top
    ]


@scenario("byzantine-gossip", nodes=16, faults_until=150.0, quiet=60.0, min_nodes=4,
          description="an insider forges membership and link entries for others and "
                      "pushes counters to 2**64-1: all refused, the victim stays alive")
def byzantine_gossip(run: Run) -> None:
    run.faults_until = _param(run, "faults_until", run.faults_until)
    mw = MeshWorld(run, loss=_param(run, "loss", 0.01))
    liar, victim, other = run.rng.sample(mw.names, 3)
    honest = [n for n in mw.names if n != liar]
    volleys = [0]

    def volley(world: World) -> None:
        volleys[0] += 1
        lies = _lies(mw, liar, victim, other, volleys[0])
        gossip = Gossip(tuple(s for s in lies[:4]), tuple(lies[4:]))
        raw = wire.encode(gossip)
        for dst in honest:
            world.transmit(liar, dst, raw, 0.0, None if world.decode_frames else gossip)
        if world.now + LIE_EVERY_S < run.faults_until:
            world.after(LIE_EVERY_S, volley, f"lies of {liar}")

    run.world.at(WARMUP, volley, f"lies of {liar}")

    def refused(world: World) -> dict[str, int]:
        total: dict[str, int] = {}
        for n in honest:
            if world.nodes[n].up:
                for reason, count in mw.core(n).statements.refused.items():
                    total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    def victim_deaths(world: World) -> int:
        return sum(1 for _, _, member, state in mw.member_events
                   if member == victim and state in ("dead", "left"))

    run.add_checker("victim-never-buried", lambda w: (
        f"{victim} was declared dead or gone {victim_deaths(w)} times" if victim_deaths(w)
        else None))
    run.metric("liar", lambda w: liar)
    run.metric("victim", lambda w: victim)
    run.metric("lies_sent", lambda w: volleys[0] * LIES_PER_VOLLEY * len(honest))
    run.metric("gossip_refused", refused)
    run.metric("gossip_refused_total", lambda w: sum(refused(w).values()))


# --------------------------------------------------------------------------- runner


def run_mesh(name: str, seed: int, nodes: int | None = None, *,
             observe: Callable[[World], None] | None = None, **params: Any) -> RunResult:
    """``run_scenario`` with parameter overrides (durations, loss) for benches and tests;
    ``observe`` is called with the world before the scenario is built (a bench's probe,
    e.g. bench/mesh_bytes.py; it must not change what the world does)."""
    spec = registry[name]
    count = spec.nodes if nodes is None else nodes
    started = time.perf_counter()
    run = Run(spec, seed, count, False)
    run.params = params  # type: ignore[attr-defined]
    if "faults_until" in params:
        run.faults_until = params["faults_until"]
    world = run.world
    if observe is not None:
        observe(world)
    violations: list[Violation] = []
    try:
        spec.build(run)
        world.run(until=run.faults_until)
        if world.violation is None:
            run.nemesis.heal_all()
            _quiet_phase(run)
    except SimError as exc:
        violations.append(Violation(world.now, "exception", str(exc), world.describe_event()))
    if world.violation is not None:
        violations.append(world.violation)
    metrics: dict[str, Any] = {"events": world.events}
    for key, value in run.metrics.items():
        metrics[key] = value(world)
    # The parameters go into the replay command (``dwcp sim run NAME --param K=V``).
    return RunResult(name, seed, count, False, not violations, violations, world.trace_hash(),
                     world.now, time.perf_counter() - started, world.events, metrics, [],
                     dict(params))
