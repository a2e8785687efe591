"""Ledger time: the primary stamps each batch, backups check the stamp against their own
clock (consensus.pbft.batch_time), and execution runs every command at its batch's time."""

from __future__ import annotations

import random
from typing import Any

import pytest

from consensus.pbft.batch_time import TIME_BOUND, US
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.messages import (
    Batch,
    Envelope,
    Prepare,
    PrePrepare,
    Request,
    batch_bytes,
    digest,
    seal,
)
from consensus.pbft.replica import Replica
from mesh import wire
from mesh.core import Action, Notify, Received, Send
from sim.hosts.operators import SIM_OPERATORS
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster, identity_for
from sim.scenarios import run_scenario
from sim.store import SimStore
from tests.harness.ledger import register

NAMES = ("n00", "n01", "n02", "n03")
KEYS = {m: identity_for(m).public for m in NAMES}
#: A wall clock far from 0, as on a real host (seconds since the epoch).
WALL = 1_800_000_000.0


def _backup(wall_offset: float = WALL) -> Replica:
    """n01, a backup of view 0 (n00 is the primary), whose wall clock is ``now + offset``."""
    return Replica("n01", identity_for("n01"), KEYS, ReplicaLog(SimStore()), random.Random(0),
                   SIM_CONFIG, SIM_OPERATORS, wall=lambda now: now + wall_offset)


def _preprepare(time_us: int, seq: int = 1, vm: str = "vm1") -> Envelope:
    """The primary n00's PRE-PREPARE of one request of n02's, stamped ``time_us``."""
    cmd = wire.encode(register(vm, "n02", WALL))
    req = seal(identity_for("n02"), "n02", Request("n02", seq, (cmd,)))
    data = batch_bytes((req.signed,), time_us)
    return seal(identity_for("n00"), "n00", PrePrepare(0, seq, digest(data)), data)


def _deliver(r: Replica, now: float, env: Envelope) -> list[Action]:
    return r.handle(now, Received("n00", env, wire.encode(env)))


def _prepares(actions: list[Action]) -> list[Prepare]:
    out = []
    for a in actions:
        if isinstance(a, Send) and isinstance(a.message, Envelope):
            body = wire.decode(a.message.body)
            if isinstance(body, Prepare):
                out.append(body)
    return out


def _refusals(actions: list[Action]) -> list[str]:
    return [a.detail["kind"] for a in actions
            if isinstance(a, Notify) and a.kind == "pbft.batch-time-refused"]


def test_a_batch_stamped_near_the_backups_clock_is_accepted() -> None:
    r = _backup()
    now = 10.0
    actions = _deliver(r, now, _preprepare(int((WALL + now - 2.0) * US)))
    assert {p.seq for p in _prepares(actions)} == {1} and not _refusals(actions)
    assert r.view == 0 and r.active


def test_a_batch_stamped_ahead_of_the_bound_is_refused_and_the_backup_changes_view() -> None:
    r = _backup()
    now = 10.0
    ahead = int((WALL + now + TIME_BOUND + 1.0) * US)
    actions = _deliver(r, now, _preprepare(ahead))
    assert not _prepares(actions) and _refusals(actions) == ["ahead"]
    assert r.view == 1 and not r.active  # suspects the primary at once
    assert r.metrics["batch_time_ahead"] == 1


def test_a_batch_stamped_behind_the_bound_gets_no_vote_and_its_requests_are_watched() -> None:
    r = _backup()
    now = 10.0
    actions = _deliver(r, now, _preprepare(int((WALL + now - TIME_BOUND - 1.0) * US)))
    assert not _prepares(actions) and _refusals(actions) == ["behind"]
    # It may be a PRE-PREPARE that arrived late: no view change yet, but the request is
    # ours to watch now, so the request timer suspects the primary if it never executes.
    assert r.view == 0 and r.active and ("n02", 1) in r.pending
    assert r.state.request_timer


def test_a_batch_stamped_below_the_one_before_it_is_refused() -> None:
    r = _backup()
    now = 10.0
    first = int((WALL + now) * US)
    assert _prepares(_deliver(r, now, _preprepare(first, seq=1, vm="vm1")))
    actions = _deliver(r, now, _preprepare(first - 1_000_000, seq=2, vm="vm2"))
    assert not _prepares(actions) and _refusals(actions) == ["backwards"]


def test_the_replicas_execute_every_command_at_its_batch_time() -> None:
    """All replicas hold the same ledger clock, the primary's stamp, although their own
    clocks differ (within the bound)."""
    c = PbftCluster.standalone(3)
    c.world.nodes["n02"].clock_offset = 20.0
    c.world.nodes["n03"].clock_offset = -20.0
    c.world.at(40.0, lambda w: c.submit("n01", register("vm1", "n01", 40.0)), "submit")
    c.world.run(until=45.0)
    clocks = {m: r.ledger.clock for m in NAMES if (r := c.replica(m)) is not None}
    assert len(set(clocks.values())) == 1, clocks
    # stamped by the primary n00 (offset 0) when it proposed, just after the submit
    assert 40.0 <= clocks["n00"] <= 40.1
    assert c.problem is None


def test_ledger_time_advances_with_batches_not_operator_requests() -> None:
    """The clock moves with every executed batch, also when the operator request it
    carries was signed long before (the freshness window is 300 s)."""
    c = PbftCluster.standalone(4)
    c.world.at(200.0, lambda w: c.submit("n01", register("vm1", "n01", 10.0)), "submit")
    c.world.run(until=205.0)
    r = c.replica("n02")
    assert r is not None and 200.0 <= r.ledger.clock <= 200.1
    assert r.ledger.vms["vm1"].owner == "n01"


@pytest.mark.parametrize(("seed", "shift", "kind"), [
    (1, 3600.0, "ahead"), (2, -3600.0, "behind"), (3, TIME_BOUND + 30.0, "ahead")])
def test_a_primary_stamping_far_off_times_is_replaced(seed: int, shift: float, kind: str) -> None:
    """The simulator's pbft-far-time: n00, primary of view 0, stamps every batch
    ``shift`` seconds off; every correct backup refuses, the view changes, every request
    commits, and no ledger clock runs ahead (the cluster's checker)."""
    res = run_scenario("pbft-far-time", seed, params={"shift": shift})
    assert res.ok, (res.violations, res.replay())
    metrics: Any = res.metrics
    assert all(r[kind] >= 1 for r in metrics["refused"].values()), metrics["refused"]
    assert all(v >= 1 for m, v in metrics["pbft"]["views"].items() if m != "n00")
    horizon = 100.0 + 30.0 + TIME_BOUND  # faults, quiet phase, the bound
    assert all(0 < t <= horizon for t in metrics["ledger_clock"].values())


def test_a_batch_time_is_pinned_by_the_digest() -> None:
    """Two batches of the same requests at different times are different batches."""
    req = seal(identity_for("n02"), "n02", Request("n02", 1, (b"x",)))
    a, b = batch_bytes((req.signed,), 1), batch_bytes((req.signed,), 2)
    assert digest(a) != digest(b)
    assert wire.decode(b, expect=(Batch,)).time_us == 2
