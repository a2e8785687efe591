"""PBFT crash recovery: scripted crash schedules at exact persist boundaries.

Each test crashes replicas right after a chosen synced write (``SimStore.after_sync``),
restarts them from what their store kept, and lets the checkers of
:class:`sim.hosts.pbft_cluster.PbftCluster` (agreement, total order, exactly-once)
judge every execution that follows. Crash faults only: no replica is Byzantine.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from mesh import wire
from sim import partitions
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster
from sim.world import World
from tests.harness.ledger import register

CONFIG = attrs.evolve(SIM_CONFIG, checkpoint_interval=4, window=8)


def crash_after(c: PbftCluster, name: str, crash_here: Callable[[str, bytes], bool],
                down_for: float) -> list[str]:
    """Crash ``name`` right after the first synced write for which ``crash_here(key, value)``
    holds, and restart it ``down_for`` seconds later; the returned list records the key."""
    hit: list[str] = []
    store = c.world.nodes[name].store

    def after_sync(key: str, _count: int) -> None:
        value = store.get(key)
        if hit or value is None or not crash_here(key, value):
            return
        hit.append(key)
        store.after_sync = None
        c.world.crash(name)
        c.world.after(down_for, lambda w: w.restart(name), f"restart {name}")

    store.after_sync = after_sync
    return hit


def after_entering_view(view: int) -> Callable[[str, bytes], bool]:
    """The first synced write after the one that records ``view`` as active: the first
    thing a replica logs once it has accepted the NEW-VIEW of ``view``."""
    seen = [False]

    def crash_here(key: str, value: bytes) -> bool:
        if seen[0]:
            return True
        if key == "pbft/view":
            rec = wire.decode(value)
            seen[0] = rec.view == view and rec.active
        return False

    return crash_here


def acknowledged(world: World) -> list[str]:
    """The clients that saw f+1 matching replies, in order."""
    return [n.node for n in world.notifications if n.kind == "ledger.committed"]


def executed(world: World, node: str) -> int:
    return max((n.detail["seq"] for n in world.notifications
                if n.node == node and n.kind == "pbft.executed"), default=0)


def test_a_decided_sequence_number_survives_crashes_right_after_a_new_view() -> None:
    """Issue 14's schedule, crash faults only. The primary n00, n01 and n02 commit seq 1
    (n03 is cut off) and the client sees f+1 replies; n00 crashes. n03 hears nothing from
    the others (one way) but its own request makes it ask for view 1; the NEW-VIEW of
    view 1 re-proposes seq 1, and n01 and n02 crash right after their first write in
    view 1, before seq 1 prepares again. Their logs must still prove seq 1 afterwards:
    otherwise the view change that follows (n01, n02, n03) finds no replica that proves
    it, and another command is decided at seq 1 (an agreement violation)."""
    c = PbftCluster.standalone(seed=3, config=CONFIG)
    a, b, cc, d = c.names
    cut = c.world.block(partitions.isolate(d, c.names))
    c.world.at(0.1, lambda w: c.submit(b, register("vm-1", b)), "submit vm-1")
    assert c.world.run(until=5.0, predicate=lambda w: all(
        executed(w, m) >= 1 for m in (a, b, cc)) and acknowledged(w) == [b])

    c.world.crash(a)
    c.world.unblock(cut)
    deaf = c.world.block(partitions.one_way([b, cc], [d]))
    hits = {m: crash_after(c, m, after_entering_view(1), down_for=0.5) for m in (b, cc)}
    c.submit(b, register("vm-2", b))  # pending, so the backups time out the primary
    c.submit(d, register("vm-3", d))
    assert c.world.run(until=c.world.now + 20.0, predicate=lambda w: bool(
        hits[b] and hits[cc] and w.nodes[b].up and w.nodes[cc].up))
    c.world.unblock(deaf)
    c.world.run(until=c.world.now + 40.0)
    assert c.problem is None, c.problem
    c.world.restart(a)
    assert c.world.run(until=c.world.now + 60.0,
                       predicate=lambda w: c.problem is not None or c.settled(w))
    assert c.problem is None, c.problem
    assert {"vm-1", "vm-3"} <= set(c.replica(a).ledger.vms)


def test_a_replica_that_missed_the_new_view_gets_it_from_restarted_peers() -> None:
    """n03 asks for view 1 but hears nothing back (one way), so it misses the NEW-VIEW;
    then n01 and n02, the replicas in view 1, crash and restart. The NEW-VIEW must
    survive in their logs and reach n03, which joins view 1 without a further view
    change; a command then commits in view 1 with n00 still down."""
    c = PbftCluster.standalone(seed=5, config=CONFIG)
    a, b, cc, d = c.names
    c.world.crash(a)
    deaf = c.world.block(partitions.one_way([b, cc], [d]))
    for m in (b, cc, d):
        c.submit(m, register(f"vm-{m}", m))  # each waits on n00, so each asks for view 1
    assert c.world.run(until=20.0, predicate=lambda w: all(
        (r := c.replica(m)) is not None and r.view == 1 and r.active for m in (b, cc)))
    for m in (b, cc):
        c.world.crash(m)
        c.world.restart(m)
    c.world.unblock(deaf)
    assert c.world.run(until=c.world.now + 10.0, predicate=lambda w: (
        (r := c.replica(d)) is not None and r.view == 1 and r.active))
    c.submit(b, register("vm-after", b))
    assert c.world.run(until=c.world.now + 10.0, predicate=lambda w: all(
        "vm-after" in r.ledger.vms for m in (b, cc, d) if (r := c.replica(m)) is not None))
    assert c.problem is None, c.problem
    assert {r.view for m in (b, cc, d) if (r := c.replica(m)) is not None} == {1}
