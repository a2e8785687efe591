"""The node core (federation.migration.dc_core) driven deterministically, without I/O: four DCs'
real PBFT replicas and migration sessions over an in-memory network and a virtual clock.
The driver plays the node's part for the VM effects (fence, rounds, verification), so
every wiring rule is checked: ledger submissions, ledger changes -> session events,
target sessions created from the ledger, and restore after a restart."""

from __future__ import annotations

import heapq
import random
from collections.abc import Hashable
from typing import Any

import attrs
import pytest

from consensus.ledger import ImportVm, MigrateVm, RegisterVm
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.replica import Replica
from federation.migration.dc_core import NodeCore
from federation.migration.precopy import HARD_MAXIMUM
from federation.migration.source import SourceSession
from federation.migration.stop_costs import StopHistory
from federation.migration.vocabulary import (
    Fence,
    MigrationError,
    PrepareIncoming,
    Retire,
    RoundSent,
    SendRound,
    SourceFenced,
    StartAtTarget,
    TargetVerified,
    Verify,
)
from mesh import identity, wire
from mesh.core import CancelTimer, Notify, Persist, Received, Send, SetTimer, TimerFired
from mesh.links.modes import Mode
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner

NAMES = ("dc1", "dc2", "dc3", "dc4")
ROOT = b"\x07" * 32
LAYOUT = (("memory", 16), ("disk-0", 8))


class MemStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        self.data[key] = value

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


class World:
    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.ids = {n: identity.generate() for n in NAMES}
        self.keys = {n: i.public for n, i in self.ids.items()}
        self.stores = {n: MemStore() for n in NAMES}
        self.done: dict[str, list[tuple[int, Any]]] = {n: [] for n in NAMES}
        self.effects: dict[str, list[Any]] = {n: [] for n in NAMES}
        self.now = 0.0
        self.queue: list[tuple[float, int, str, Any]] = []
        self.timers: dict[tuple[str, Hashable], float] = {}
        self.seq = 0
        self.ops = OperatorSigner("ops", prefix=f"core{seed}")
        #: (destination, event) -> True to lose that delivery
        self.drop: Any = None
        self.cores = {n: self.boot(n) for n in NAMES}

    def boot(self, name: str) -> NodeCore:
        replica = Replica(name, self.ids[name], self.keys, ReplicaLog(self.stores[name]),
                          random.Random(self.rng.getrandbits(64)), operators=SIM_OPERATORS)
        core = NodeCore(name, replica,
                        on_ledger_done=lambda rid, res: self.done[name].append((rid, res)),
                        mode_of=lambda dst: Mode.DATACENTER)
        self.apply(name, core.start(self.now))
        return core

    def apply(self, name: str, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                raw = wire.encode(a.message)  # what crosses the wire, decoded on arrival
                self.seq += 1
                heapq.heappush(self.queue, (self.now + 0.001, self.seq, a.peer,
                                            Received(name, wire.decode(raw), raw)))
            elif isinstance(a, SetTimer):
                self.timers[(name, a.key)] = a.at
            elif isinstance(a, CancelTimer):
                self.timers.pop((name, a.key), None)
            elif isinstance(a, Persist):
                self.stores[name].put(a.key, a.value)
            elif not isinstance(a, Notify):
                self.effects[name].append(a)

    def run(self, until: float) -> None:
        """Deliver messages and fire timers in time order up to ``until``."""
        while True:
            t_msg = self.queue[0][0] if self.queue else float("inf")
            due = min(self.timers.items(), key=lambda kv: kv[1], default=None)
            t_tmr = due[1] if due else float("inf")
            if min(t_msg, t_tmr) > until:
                self.now = until
                return
            if t_msg <= t_tmr:
                self.now, _, dst, ev = heapq.heappop(self.queue)
            else:
                (dst, key), self.now = due  # type: ignore[misc]
                del self.timers[(dst, key)]
                ev = TimerFired(key)
            if dst in self.cores and not (self.drop is not None and self.drop(dst, ev)):
                self.apply(dst, self.cores[dst].handle(self.now, ev))

    def call(self, name: str, fn: Any) -> Any:
        out = fn(self.cores[name], self.now)
        actions = out[1] if isinstance(out, tuple) else out
        self.apply(name, actions)
        return out

    def take(self, name: str, kind: type) -> Any:
        for i, a in enumerate(self.effects[name]):
            if isinstance(a, kind):
                return self.effects[name].pop(i)
        raise AssertionError(f"{name} has no {kind.__name__} among {self.effects[name]}")

    def feed(self, name: str, mid: str, event: Any) -> None:
        self.call(name, lambda c, now: c.to_session(now, mid, event))

    def plan(self, name: str, mid: str, vm: str, target: str) -> Any:
        auth = self.ops.authorize(MigrateVm(vm, target, name, 0), self.now)
        return self.call(name, lambda c, now: c.plan_migration(now, mid, vm, target, LAYOUT,
                                                               (1,), (1,), auth))


def _register(w: World) -> None:
    auth = w.ops.authorize(ImportVm("vm1", "dc1", "/m"), w.now)
    rid, _ = w.call("dc1", lambda c, now: c.submit(now, RegisterVm("vm1", "dc1", auth)))
    w.run(w.now + 1)
    assert [(r, res.ok) for r, res in w.done["dc1"]] == [(rid, True)]


def test_a_migration_through_the_cores_and_the_ledger() -> None:
    w = World()
    _register(w)
    mid = "m-1"
    w.plan("dc1", mid, "vm1", "dc3")
    w.run(w.now + 1)
    # the ledger's begin created the target session at dc3 (only there)
    assert mid in w.cores["dc3"].sessions and mid not in w.cores["dc2"].sessions
    assert w.take("dc3", PrepareIncoming).layout == LAYOUT
    first = w.take("dc1", SendRound)
    assert (first.round, first.dirty, first.final, first.version) == (1, False, False, 1)
    w.feed("dc1", mid, RoundSent(1, 24, 24 * 4096, 24 * 4096 + 100, 0.5, 0))
    w.take("dc1", Fence)
    w.feed("dc1", mid, SourceFenced(ROOT))
    final = w.take("dc1", SendRound)
    assert final.final and final.round == 2
    w.feed("dc1", mid, RoundSent(2, 0, 0, 0, 0.01, 0))
    w.run(w.now + 1)
    w.take("dc3", Verify)
    w.feed("dc3", mid, TargetVerified(ROOT))
    w.run(w.now + 1)
    assert w.take("dc3", StartAtTarget).epoch == 1
    w.take("dc1", Retire)
    for name, core in w.cores.items():
        ledger = core.replica.ledger
        assert (ledger.owner("vm1"), ledger.epoch("vm1")) == ("dc3", 1), name
        assert ledger.migrations[mid].state == "committed"
    assert w.cores["dc1"].outcomes[mid].outcome == "committed"
    assert w.cores["dc3"].outcomes[mid].outcome == "committed"
    assert w.cores["dc1"].sessions[mid].phase.value == "committed"


def test_a_wrong_root_aborts_and_the_source_runs_again() -> None:
    w = World(2)
    _register(w)
    mid = "m-2"
    w.plan("dc1", mid, "vm1", "dc2")
    w.run(w.now + 1)
    w.take("dc1", SendRound)
    w.feed("dc1", mid, RoundSent(1, 24, 24 * 4096, 24 * 4096, 0.5, 0))
    w.take("dc1", Fence)
    w.feed("dc1", mid, SourceFenced(ROOT))
    w.feed("dc1", mid, RoundSent(2, 0, 0, 0, 0.01, 0))
    w.run(w.now + 1)
    w.feed("dc2", mid, TargetVerified(b"\x08" * 32))
    w.run(w.now + 1)
    for core in w.cores.values():
        assert core.replica.ledger.migrations[mid].state == "aborted"
        assert core.replica.ledger.owner("vm1") == "dc1"
    assert w.cores["dc1"].outcomes[mid].outcome == "aborted"
    assert "root" in w.cores["dc2"].outcomes[mid].reason
    assert any(type(a).__name__ == "Unfence" for a in w.effects["dc1"])


def test_a_restarted_source_aborts_its_precopy_and_a_second_plan_is_refused() -> None:
    w = World(3)
    _register(w)
    mid = "m-3"
    w.plan("dc1", mid, "vm1", "dc4")
    w.run(w.now + 1)
    w.take("dc1", SendRound)
    with pytest.raises(MigrationError, match="already migrating"):
        w.plan("dc1", "m-x", "vm1", "dc2")
    # dc1 crashes in pre-copy and restarts from its store
    w.cores["dc1"] = core = w.boot("dc1")
    stored = {k.split("/", 1)[1]: v for k, v in w.stores["dc1"].data.items()
              if k.startswith("migration/")}
    w.call("dc1", lambda c, now: c.restore_records(now, stored))
    w.run(w.now + 5)
    assert core.sessions[mid].phase.value == "aborted"
    for c in w.cores.values():
        assert c.replica.ledger.migrations[mid].state == "aborted"
        assert c.replica.ledger.owner("vm1") == "dc1"


def test_the_target_aborts_on_its_own_once_the_deadline_passes_in_ledger_time() -> None:
    """The source vanishes after the begin. The target may abort on its own only after
    the migration's deadline in ledger time; the primary's batch times move that clock
    (consensus.pbft.batch_time), so the abort passes on time with no operator request
    in between (before, ledger time followed only operator requests and stood still)."""
    w = World(4)
    _register(w)
    mid = "m-4"
    w.plan("dc1", mid, "vm1", "dc3")
    w.run(w.now + 1)
    assert mid in w.cores["dc3"].sessions
    deadline = w.cores["dc3"].ledger.migrations[mid].deadline
    del w.cores["dc1"]  # gone for good: its messages and timers go nowhere
    w.run(deadline - 1)
    assert w.cores["dc3"].ledger.migrations[mid].state == "begun"
    # the stall gave up long ago; the target's own abort waits for its timeout
    assert w.cores["dc3"].sessions[mid].phase.value == "aborting"
    w.run(deadline + 30)  # the dead primary dc1 costs a view change (2 s, doubling)
    for name, core in w.cores.items():
        rec = core.ledger.migrations[mid]
        assert rec.state == "aborted", name
        assert core.ledger.owner("vm1") == "dc1"
        assert deadline <= core.ledger.clock < deadline + 30
    assert w.cores["dc3"].outcomes[mid].outcome == "aborted"


def test_commands_ready_together_are_signed_together_and_complete_one_by_one() -> None:
    """The node's own commands and its sessions' ledger writes of one step go out as few
    REQUESTs as MAX_REQUEST_COMMANDS allows (issue 14 item 5), each with its own result."""
    w = World(5)
    cmds = [RegisterVm(f"vm{i}", "dc2", w.ops.authorize(ImportVm(f"vm{i}", "dc2", "/m"), w.now))
            for i in range(10)]
    rids, _ = w.call("dc2", lambda c, now: c.submit_many(now, cmds))
    assert len(rids) == 10 and len(set(rids)) == 10 and None not in rids
    assert w.cores["dc2"].counters["requests_submitted"] == 2  # 8 + 2
    assert w.cores["dc2"].counters["commands_submitted"] == 10
    w.run(w.now + 1)
    assert {rid for rid, _ in w.done["dc2"]} == set(rids)
    assert all(res.ok for _, res in w.done["dc2"])
    assert sorted(w.cores["dc3"].ledger.vms) == sorted(f"vm{i}" for i in range(10))
    # the same operator request twice in one REQUEST: its first outcome, executed once
    again, _ = w.call("dc2", lambda c, now: c.submit_many(now, [cmds[0], cmds[0]]))
    w.run(w.now + 1)
    results = dict(w.done["dc2"])
    assert [results[r].ok for r in again] == [True, True]
    assert len(w.cores["dc3"].ledger.vms) == 10


def test_the_node_hears_of_its_command_once_its_own_ledger_holds_it() -> None:
    """f+1 replies can arrive before this DC's replica executes the command; the node
    reports the result only once its own ledger has it (read your writes: an import is
    followed by a migration planned against this DC's ledger)."""
    w = World(6)
    heard: list[tuple[int, str | None]] = []
    core = w.cores["dc4"]
    core.on_ledger_done = lambda rid, res: heard.append((rid, core.ledger.owner("vm9")))

    def commits_to_dc4(dst: str, ev: Any) -> bool:
        return dst == "dc4" and isinstance(ev, Received) and b"pbft.commit" in ev.message.body

    w.drop = commits_to_dc4  # dc4 cannot decide: the others' REPLYs come first
    auth = w.ops.authorize(ImportVm("vm9", "dc4", "/m"), w.now)
    rid, _ = w.call("dc4", lambda c, now: c.submit(now, RegisterVm("vm9", "dc4", auth)))
    w.run(w.now + 0.5)
    assert w.cores["dc1"].ledger.owner("vm9") == "dc4"  # committed, f+1 replied
    assert heard == [] and core.ledger.owner("vm9") is None
    w.drop = None  # dc4 catches up (retransmission, state transfer)
    w.run(w.now + 10)
    assert heard == [(rid, "dc4")]


def _abort_one(w: World, mid: str, target: str = "dc2") -> None:
    """A migration of vm1 from dc1 that ends aborted (the target finds another root)."""
    for effects in w.effects.values():
        effects.clear()
    w.plan("dc1", mid, "vm1", target)
    w.run(w.now + 1)
    w.take("dc1", SendRound)
    w.feed("dc1", mid, RoundSent(1, 24, 24 * 4096, 24 * 4096, 0.5, 0))
    w.take("dc1", Fence)
    w.feed("dc1", mid, SourceFenced(ROOT))
    w.feed("dc1", mid, RoundSent(2, 0, 0, 0, 0.01, 0))
    w.run(w.now + 1)
    w.feed(target, mid, TargetVerified(b"\x08" * 32))
    w.run(w.now + 5)
    assert w.cores["dc1"].outcomes[mid].outcome == "aborted"


def test_ended_sessions_are_forgotten_past_the_bounds_and_stay_counted() -> None:
    """The node keeps ended sessions for a time and up to a count (a node that migrates
    all day kept every one since its start): beyond them a session, its progress and its
    outcome go, the outcome still counted, the migration still shown from the ledger."""
    w = World(7)
    _register(w)
    for i in range(3):
        _abort_one(w, f"m-{i}")
    core, target = w.cores["dc1"], w.cores["dc2"]
    counts = core.outcome_counts()
    assert counts == {("source", "aborted"): 3} and core.ended_sessions() == 3
    assert core.forget_ended(w.now, 3600, 3) == []  # within both bounds
    assert core.forget_ended(w.now, 3600, 1) == ["m-0", "m-1"]  # the oldest first
    assert set(core.sessions) == set(core.outcomes) == set(core.progress) == {"m-2"}
    assert core.outcome_counts() == counts and core.ended_sessions() == 1
    view = core.migration("m-0")
    assert view is not None and view.session is None and view.outcome is None
    assert view.ledger is not None and view.ledger.state == "aborted"
    assert core.forget_ended(w.now, 3600, 10) == []
    assert core.forget_ended(w.now + 3600, 3600, 10) == ["m-2"]
    assert core.sessions == {} and core.outcome_counts() == counts
    # the target's sessions go the same way; a later migration is unaffected
    assert target.forget_ended(w.now, 0, 10) == ["m-0", "m-1", "m-2"]
    _abort_one(w, "m-3")
    assert set(core.sessions) == {"m-3"}
    assert core.outcome_counts() == {("source", "aborted"): 4}


def test_a_session_the_ledger_here_shows_begun_is_not_forgotten() -> None:
    """A session ended but this DC's ledger still shows its migration begun (a replica
    behind, after a restart): forgetting it would let the record's begin make a target
    session again (the re-run restore.py guards against), so it stays until it is not."""
    w = World(8)
    _register(w)
    _abort_one(w, "m-0")
    core = w.cores["dc2"]
    ledger = core.replica.ledger.migrations
    decided = ledger["m-0"]
    ledger["m-0"] = attrs.evolve(decided, state="begun")  # type: ignore[misc]  # as behind
    assert core.forget_ended(w.now, 0, 0) == []
    ledger["m-0"] = decided
    assert core.forget_ended(w.now, 0, 0) == ["m-0"]


def test_restored_ended_sessions_are_forgotten_too() -> None:
    w = World(9)
    _register(w)
    _abort_one(w, "m-0")
    w.cores["dc1"] = core = w.boot("dc1")  # a restart restores every persisted session
    stored = {k.split("/", 1)[1]: v for k, v in w.stores["dc1"].data.items()
              if k.startswith("migration/")}
    w.call("dc1", lambda c, now: c.restore_records(now, stored))
    w.run(w.now + 5)
    assert set(core.sessions) == {"m-0"} and core.ended_sessions() == 1
    assert core.forget_ended(w.now + 3600, 3600, 10) == ["m-0"]


def test_the_status_lists_the_migrations_begun_last_and_counts_them_all() -> None:
    w = World(10)
    _register(w)
    for i in range(4):
        _abort_one(w, f"m-{i}")
    core = w.cores["dc1"]
    assert core.recent_migration_ids(2) == (["m-2", "m-3"], 4)
    assert core.recent_migration_ids(10) == (["m-0", "m-1", "m-2", "m-3"], 4)
    w.plan("dc1", "m-4", "vm1", "dc3")  # under way here: listed whatever the bound
    assert core.recent_migration_ids(0) == (["m-4"], 5)
def test_the_node_core_reserves_the_stop_window_its_last_migration_measured() -> None:
    w = World(7)
    _register(w)
    history = w.cores["dc1"].stop_history = StopHistory()
    auth = w.ops.authorize(MigrateVm("vm1", "dc3", "dc1", 0), w.now)
    # a VM with a downtime limit of its own (a qemu guest): the prior is reserved
    w.call("dc1", lambda c, now: c.plan_migration(now, "m-9", "vm1", "dc3", LAYOUT, (1,),
                                                  (1,), auth, b"spec", 0.3))
    s = w.cores["dc1"].sessions["m-9"]
    assert isinstance(s, SourceSession)
    assert s.reserve == pytest.approx(history.estimate("vm1").reserve) and s.reserve > 0
    assert s.ceiling == HARD_MAXIMUM and s.reserve_measured == ()
    w.run(w.now + 1)
    w.take("dc1", SendRound)
    w.feed("dc1", "m-9", RoundSent(1, 24, 24 * 4096, 24 * 4096 + 100, 0.5, 0, 0.4))
    w.take("dc1", Fence)
    w.now += 0.25  # the fence: stop, device state, root
    w.feed("dc1", "m-9", SourceFenced(ROOT))
    w.take("dc1", SendRound)
    w.now += 0.05
    w.feed("dc1", "m-9", RoundSent(2, 0, 0, 0, 0.05, 0, 0.04))
    w.run(w.now + 1)
    w.take("dc3", Verify)
    w.feed("dc3", "m-9", TargetVerified(ROOT))
    w.run(w.now + 1)
    w.take("dc1", Retire)
    assert w.cores["dc1"].outcomes["m-9"].outcome == "committed"
    measured = history.by_vm["vm1"]
    assert measured.fence_s == pytest.approx(0.25) and measured.after_s is not None
    assert measured.final_fixed_s == pytest.approx(0.05)  # no pages: all of it fixed
    # the next migration of vm1 from here reserves what this one measured
    est = history.estimate("vm1")
    assert set(est.measured) == {"fence_s", "final_fixed_s", "after_s"}
    assert est.reserve == pytest.approx(0.25 + 0.05 + measured.after_s)
    # a migration without a VM downtime limit of its own (an image VM) reserves nothing
    w.cores["dc3"].stop_history = StopHistory()
    auth = w.ops.authorize(MigrateVm("vm1", "dc1", "dc3", 1), w.now)
    w.call("dc3", lambda c, now: c.plan_migration(now, "m-10", "vm1", "dc1", LAYOUT, (1,),
                                                  (1,), auth))
    back = w.cores["dc3"].sessions["m-10"]
    assert isinstance(back, SourceSession) and back.reserve == 0.0
