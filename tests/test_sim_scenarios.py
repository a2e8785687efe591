"""Scenario runs: determinism by seed (also across PYTHONHASHSEED), checkers that catch
real bugs, the quiet phase's liveness bound, the swarm, and the ``dwcp sim`` CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sim.scenarios  # noqa: F401
from sim import partitions
from sim.cli import register
from sim.hosts.counter_cores import CounterCore
from sim.scenario import Run, scenario
from sim.scenarios import registry, run_scenario
from sim.world import WALL_CHECK_EVENTS, World

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(registry)

OWN = [n for n in NAMES if n.startswith(("counter-", "echo-"))]
#: Every registered scenario (other engineers' too) is checked for determinism up to this
#: virtual time and with at most SMALL nodes: thousands of events each, yet the whole
#: registry fits the test budget (the mesh scenarios take ~0.3 s per virtual second at
#: 16 nodes on this machine).
HORIZON = 15.0
SMALL = 6


def small(name: str) -> int:
    spec = registry[name]
    return max(spec.min_nodes, min(spec.nodes, SMALL))

_HASHES_SCRIPT = """
import json, sys
import sim.scenarios
from sim.scenarios import registry, run_scenario
sizes, horizon = json.loads(sys.argv[1]), float(sys.argv[2])
out = {}
for name in sorted(registry):
    for swarm in ((False, True) if name.startswith(("counter-", "echo-")) else (False,)):
        out[f"{name}/{swarm}"] = run_scenario(name, 11, sizes[name], swarm=swarm,
                                              horizon=horizon).trace_hash
print(json.dumps(out))
"""


def test_own_scenarios_are_registered() -> None:
    assert {"counter-calm", "counter-partitions", "counter-crashes", "counter-byzantine",
            "echo-geo"} <= set(OWN)


@pytest.mark.parametrize("name", OWN)
def test_own_scenarios_pass_and_replay_exactly(name: str) -> None:
    first = run_scenario(name, 11)
    again = run_scenario(name, 11)
    assert first.ok, first.as_json()["violations"]
    assert first.trace_hash == again.trace_hash
    assert first.events == again.events and first.metrics["nemesis"] == again.metrics["nemesis"]


def test_every_scenario_same_seed_same_trace_also_across_pythonhashseed() -> None:
    """Each registered scenario, seed 11, in this process and in a subprocess with another
    PYTHONHASHSEED, gives one trace hash; seed 12 gives another."""
    seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    child = subprocess.Popen([sys.executable, "-c", _HASHES_SCRIPT,
                              json.dumps({n: small(n) for n in NAMES}), str(HORIZON)],
                             cwd=ROOT, env=dict(os.environ, PYTHONHASHSEED=seed),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    here: dict[str, str] = {}
    for name in NAMES:
        for swarm in ((False, True) if name in OWN else (False,)):
            here[f"{name}/{swarm}"] = run_scenario(name, 11, small(name), swarm=swarm,
                                                   horizon=HORIZON).trace_hash
        other = run_scenario(name, 12, small(name), horizon=HORIZON).trace_hash
        assert other != here[f"{name}/False"], name
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-2000:]
    there = json.loads(out)
    differ = sorted(k for k in here if there.get(k) != here[k])
    assert not differ, f"trace hash depends on the process or PYTHONHASHSEED: {differ}"


@pytest.mark.parametrize("name", ["counter-partitions", "counter-crashes", "counter-byzantine"])
def test_counter_scenarios_survive_swarms(name: str) -> None:
    for seed in range(3):
        result = run_scenario(name, seed, swarm=True)
        assert result.ok, (result.replay(), result.as_json()["violations"])
        assert result.faults


def test_swarm_draws_every_fault_kind_over_seeds() -> None:
    kinds: set[str] = set()
    for seed in range(8):
        kinds |= {f.split()[0] for f in run_scenario("counter-calm", seed, swarm=True).faults}
    assert kinds == {"partition", "one-way", "cut", "clog", "degrade", "crash", "clock",
                     "byzantine"}


def test_counter_scenarios_use_every_fault_of_the_nemesis() -> None:
    log = " ".join(line for name in ("counter-partitions", "counter-crashes",
                                     "counter-byzantine")
                   for line in run_scenario(name, 5).metrics["nemesis"])
    for word in ("halves", "isolate", "bridge", "ring", "one-way", "cut", "crash", "restart",
                 "clog", "degrade", "clock", "byzantine"):
        assert word in log, word
    byz = run_scenario("counter-byzantine", 5).metrics["byzantine"]
    assert all(byz[k] > 0 for k in ("dropped", "delayed", "duplicated", "replayed",
                                    "corrupted", "equivocated"))


# --------------------------------------------------------------------------- checkers bite


def test_unsynced_acknowledgement_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    original = CounterCore.increment

    def careless(self: CounterCore, now: float, amount: int = 1) -> list[Any]:
        actions = original(self, now, amount)
        return [type(a)(a.key, a.value, sync=False) if hasattr(a, "sync") else a
                for a in actions]

    monkeypatch.setattr(CounterCore, "increment", careless)
    result = run_scenario("counter-crashes", 1)
    assert not result.ok
    v = result.violations[0]
    assert v.checker == "acknowledged-only" and "lost acknowledged increments" in v.message
    assert "start" in v.event
    replay = run_scenario("counter-crashes", 1)
    assert replay.violations[0] == v and replay.trace_hash == result.trace_hash


def test_corrupt_frames_that_still_decode_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its digest check the counter believes bit-flipped frames that still decode;
    the Byzantine corrupter in counter-byzantine must make the checker see that."""
    from sim.hosts import counter_cores as counter

    original = counter.CounterCore._on_state

    def trusting(self: CounterCore, now: float, peer: str, msg: Any) -> list[Any]:
        if isinstance(msg, counter.CounterState):
            msg = counter.CounterState(msg.origin, msg.counts, msg.reply,
                                       counter.counts_digest(msg.origin, msg.counts))
        return original(self, now, peer, msg)

    monkeypatch.setattr(counter.CounterCore, "_on_state", trusting)
    # Seed 1 flips a bit inside a value (the frame stays canonical CBOR, so it decodes);
    # most flips break the frame and are refused by the decoder instead.
    result = run_scenario("counter-byzantine", 1)
    assert not result.ok
    v = result.violations[0]
    assert v.checker == "acknowledged-only" and "learned" in v.message
    assert "Received" in v.event


@pytest.fixture
def stuck_scenario() -> Iterator[str]:
    @scenario("test-stuck", nodes=4, faults_until=10.0, quiet=5.0)
    def stuck(run: Run) -> None:
        from sim.scenarios.counter import CounterWorld

        cw = CounterWorld(run)
        cw.workload(run.faults_until)
        # Blocked by the world, not the nemesis: the quiet phase does not heal it.
        run.world.block(partitions.isolate(cw.names[0], cw.names))

    yield "test-stuck"
    del registry["test-stuck"]


@pytest.fixture
def storm_scenario() -> Iterator[str]:
    """A run that never ends: a callback that schedules itself again at the same
    virtual time, so virtual time never reaches the end of the fault phase."""

    @scenario("test-storm", nodes=2, faults_until=10.0, quiet=5.0)
    def storm(run: Run) -> None:
        def again(world: World) -> None:
            world.at(world.now, again, "again")

        run.world.at(1.0, again, "again")

    yield "test-storm"
    del registry["test-storm"]


def test_a_run_past_its_wall_clock_bound_fails_and_says_so(storm_scenario: str) -> None:
    started = time.monotonic()
    result = run_scenario(storm_scenario, 1, wall_limit=0.3)
    assert time.monotonic() - started < 5.0
    assert not result.ok
    v = result.violations[0]
    assert v.checker == "wall-clock" and "longer than its wall-clock bound" in v.message
    assert v.time == pytest.approx(1.0) and result.events > WALL_CHECK_EVENTS


def test_a_wall_clock_bound_that_does_not_fire_changes_nothing() -> None:
    free = run_scenario("counter-partitions", 3)
    bounded = run_scenario("counter-partitions", 3, wall_limit=600.0)
    assert free.ok and bounded.ok and free.trace_hash == bounded.trace_hash


def test_liveness_is_checked_within_the_quiet_bound(stuck_scenario: str) -> None:
    result = run_scenario(stuck_scenario, 1)
    assert not result.ok
    v = result.violations[0]
    assert v.checker == "liveness" and "within 5 s" in v.message
    assert v.time == pytest.approx(15.0)


# --------------------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dwcp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_list_and_run_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _cli(["sim", "list"]) == 0
    assert "counter-calm" in capsys.readouterr().out
    trace = tmp_path / "trace.txt"
    assert _cli(["sim", "run", "counter-calm", "--seed", "4", "--json", "--nodes", "3",
                 "--trace", str(trace)]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("scenario", "seed", "ok", "violations", "trace_hash", "sim_seconds",
                "wall_seconds", "metrics"):
        assert key in out
    assert out["ok"] and out["nodes"] == 3 and out["seed"] == 4
    assert len(trace.read_text().splitlines()) == out["events"]


def test_cli_run_failure_prints_replay(stuck_scenario: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["sim", "run", stuck_scenario, "--seed", "2"]) == 1
    out = capsys.readouterr().out
    assert "replay: dwcp sim run test-stuck --seed 2 --nodes 4" in out


def test_cli_sweep_reports_failures_with_replay(stuck_scenario: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["sim", "sweep", "counter-calm", "--seeds", "1-4", "--jobs", "2"]) == 0
    assert "4 runs, 0 failed" in capsys.readouterr().out
    assert _cli(["sim", "sweep", stuck_scenario, "--seeds", "3-4", "--jobs", "2"]) == 1
    captured = capsys.readouterr()
    for seed in (3, 4):
        assert f"replay: dwcp sim run test-stuck --seed {seed} --nodes 4" in captured.out
    assert "2/2 runs, 2 failed" in captured.err


def test_cli_sweep_goes_on_past_a_run_that_never_ends(storm_scenario: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["sim", "sweep", storm_scenario, "--seeds", "1-2", "--jobs", "2",
                 "--run-timeout", "0.3"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("[wall-clock]") == 2 and "2/2 runs, 2 failed" in captured.err
    assert "replay: dwcp sim run test-storm --seed 1 --nodes 2" in captured.out


def test_cli_errors_name_the_option() -> None:
    from federation.cli.main import CommandError

    with pytest.raises(CommandError, match="no scenario named 'nope'"):
        _cli(["sim", "run", "nope", "--seed", "1"])
    with pytest.raises(CommandError, match="--seeds"):
        _cli(["sim", "sweep", "counter-calm", "--seeds", "5-x"])
    with pytest.raises(CommandError, match="--run-timeout -1"):
        _cli(["sim", "sweep", "counter-calm", "--seeds", "1", "--run-timeout", "-1"])
    with pytest.raises(CommandError, match="--nodes 1"):
        _cli(["sim", "run", "counter-partitions", "--seed", "1", "--nodes", "1"])


# --------------------------------------------------------------------------- long sweeps


@pytest.mark.slow
@pytest.mark.parametrize("name", ["counter-calm", "counter-partitions", "counter-crashes",
                                  "counter-byzantine"])
def test_long_swarm_sweep(name: str) -> None:
    failed = [run_scenario(name, seed, swarm=True) for seed in range(200)]
    failed = [r for r in failed if not r.ok]
    assert not failed, [(r.replay(), r.violations[0]) for r in failed[:3]]


@pytest.mark.slow
def test_long_sweep_at_sixteen_nodes() -> None:
    for seed in range(20):
        result = run_scenario("counter-partitions", seed, nodes=16, swarm=True)
        assert result.ok, (result.replay(), result.violations)
