"""A two-DC world for migration sessions: the real ledger state machine, a fake network,
fake VM drivers and crash/restart from persisted records; and :class:`MigrationMachine`,
which drives it with random interleavings (hypothesis).

tests/test_migration_stateful.py runs the seeded plain paths and the machine;
tests/test_cancel_session.py adds an operator's cancel to the machine. Every driver
action is checked where it is carried out: the final round starts only at a fenced
source, the target starts only after the commit with the ledger's epoch, the source
un-fences only after an abort.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from consensus.ledger import (
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    ChangePolicy,
    CommitMigration,
    ImportVm,
    Ledger,
    LedgerResult,
    MigrateVm,
    RegisterVm,
    SetPolicy,
)
from federation.migration.restore import restore
from federation.migration.session import SessionBase
from federation.migration.source import SourceSession
from federation.migration.target import TargetSession
from federation.migration.vocabulary import (
    ActionFailed,
    CancelRound,
    DiscardIncoming,
    Fence,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    LedgerRootAnnounced,
    LoadDevice,
    Phase,
    PolicyChanged,
    PrecopyLimits,
    PrepareIncoming,
    Retire,
    RoundSent,
    SendRound,
    SourceFenced,
    StartAtTarget,
    SubmitLedger,
    TargetVerified,
    Throttle,
    TransferProgress,
    Unfence,
    Verify,
    record_key,
)
from mesh import wire
from mesh.core import (
    CancelTimer,
    Notify,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner

SRC, TGT = "dc1", "dc2"
VM = "vm1"
MID = "m-1"
LIMITS = PrecopyLimits(max_rounds=5, downtime=0.5)
LAYOUT = (("memory", 64), ("disk-0", 32))


def root_of(content: int) -> bytes:
    return hashlib.sha256(b"content %d" % content).digest()


@attrs.define
class Job:
    """A round in flight: what the source held when it started."""

    round: int
    final: bool
    content: int


class World:
    """One migration of ``vm1`` from dc1 to dc2 (see the module docstring)."""

    def __init__(self, policy: SetPolicy | None = None) -> None:
        self.ledger = Ledger(("dc1", "dc2", "dc3"), SIM_OPERATORS)
        self.rid = {"dc1": 1, "dc2": 1}
        self.now = 0.0
        #: the operators, signing at the world's time
        self.ops = OperatorSigner("admin", prefix="world")
        self._execute(SRC, RegisterVm(VM, SRC, self.ops.authorize(ImportVm(VM, SRC, "/m"), 0.0)))
        if policy is not None:
            self._execute(SRC, ChangePolicy(self.ops.authorize(policy, 0.0)))
        self.store: dict[str, dict[str, bytes]] = {SRC: {}, TGT: {}}
        self.sessions: dict[str, SessionBase | None] = {SRC: None, TGT: None}
        self.up = {SRC: True, TGT: True}
        self.partitioned = False
        self.timers: dict[str, dict[Any, float]] = {SRC: {}, TGT: {}}
        self.inbox: dict[str, list[Any]] = {SRC: [], TGT: []}
        self.net: list[tuple[str, str, Any]] = []
        self.ledger_queue: list[tuple[str, Any]] = []
        self.facts: list[Any] = []
        self.cursor = {SRC: 0, TGT: 0}
        # the VM at the source and the copy at the target
        self.src_running = True
        self.src_fenced = False
        self.src_retired = False
        #: the throttle the source session put on its running VM (percent)
        self.src_throttle = 0
        self.content = 0
        self.fenced_content: int | None = None
        self.tgt_prepared = False
        self.tgt_content: int | None = None
        self.tgt_started: int | None = None
        self.jobs: list[Job] = []
        self.fence_pending = False
        self.verify_pending = False
        self.max_epoch = 0
        self.notes: list[Notify] = []
        session = SourceSession.plan(SRC, MID, VM, TGT, 0, LAYOUT, LIMITS,
                                     self.ledger.policy, (1, 3), (1, 3),
                                     self.ops.authorize(MigrateVm(VM, TGT, SRC, 0), self.now))
        self.sessions[SRC] = session
        self.apply(SRC, session.start(self.now))

    # ------------------------------------------------------------------ the ledger

    def _execute(self, client: str, command: Any) -> LedgerResult:
        rid = self.rid[client]
        self.rid[client] += 1
        raw = self.ledger.execute(client, rid, wire.encode(command))
        return wire.decode(raw, expect=(LedgerResult,))

    def execute_next(self, index: int = 0) -> None:
        client, command = self.ledger_queue.pop(index % len(self.ledger_queue))
        before = self.mig_state()
        result = self._execute(client, command)
        mig = self.ledger.migrations.get(MID)
        if not result.ok:
            if self.up[client]:
                self.inbox[client].append(LedgerRefused(command, result.error))
            return
        # A fact is what the ledger's state became, as a node learns it: a command the
        # ledger answers ok without a change (a begin sent again after the migration
        # ended, a second abort) tells no one anything new.
        moved = self.mig_state() != before
        if isinstance(command, BeginMigration):
            if moved:
                self.facts.append(LedgerBegun(MID, command.epoch))
        elif isinstance(command, AnnounceRoot):
            self.facts.append(LedgerRootAnnounced(MID, command.root))
        elif isinstance(command, CommitMigration):
            assert mig is not None
            if moved:
                self.facts.append(LedgerCommitted(MID, mig.epoch + 1, command.root))
        elif isinstance(command, AbortMigration):
            if moved:
                self.facts.append(LedgerAborted(MID))

    def deliver_fact(self, node: str) -> None:
        fact = self.facts[self.cursor[node]]
        self.cursor[node] += 1
        if node == TGT and isinstance(fact, LedgerBegun) and self.sessions[TGT] is None:
            if self.store[TGT].get(record_key(MID)) is None:
                session, actions = TargetSession.from_ledger(TGT, MID, VM, SRC, fact.epoch,
                                                             LIMITS, self.now)
                self.sessions[TGT] = session
                self.apply(TGT, actions)
            return
        self.feed(node, fact)

    def mig_state(self) -> str | None:
        mig = self.ledger.migrations.get(MID)
        return mig.state if mig else None

    # ------------------------------------------------------------------ driving sessions

    def feed(self, node: str, event: Any) -> None:
        session = self.sessions[node]
        if session is None or not self.up[node]:
            return
        self.apply(node, session.handle(self.now, event))

    def apply(self, node: str, actions: list[Any]) -> None:
        for a in actions:
            self.carry_out(node, a)
        self.check()

    def carry_out(self, node: str, a: Any) -> None:
        if isinstance(a, Persist):
            self.store[node][a.key] = a.value
        elif isinstance(a, SetTimer):
            self.timers[node][a.key] = a.at
        elif isinstance(a, CancelTimer):
            self.timers[node].pop(a.key, None)
        elif isinstance(a, Notify):
            self.notes.append(a)
        elif isinstance(a, SubmitLedger):
            self.ledger_queue.append((node, a.command))
        elif isinstance(a, Send):
            self.net.append((node, a.peer, a.message))
        elif isinstance(a, SendRound):
            assert node == SRC
            if a.final:
                assert self.src_fenced and not self.src_running, "final round before the fence"
            self.jobs.append(Job(a.round, a.final, self.content))
        elif isinstance(a, CancelRound):
            self.jobs.clear()
        elif isinstance(a, Fence):
            assert node == SRC
            self.src_running = False
            self.src_fenced = True
            self.fenced_content = self.content
            self.src_throttle = 0
            self.fence_pending = True
        elif isinstance(a, Throttle):
            # auto-converge holds a running guest in pre-copy, never a fenced one
            assert node == SRC and self.src_running and not self.src_fenced, \
                "throttled a VM that is not running at its source"
            assert 0 <= a.percent < 100
            self.src_throttle = a.percent
        elif isinstance(a, Unfence):
            assert node == SRC and self.mig_state() == "aborted", "un-fenced without an abort"
            self.src_fenced = False
            self.src_running = True
            self.src_throttle = 0
        elif isinstance(a, Retire):
            assert node == SRC and self.mig_state() == "committed", "retired without a commit"
            self.src_running = False
            self.src_retired = True
            self.src_throttle = 0
        elif isinstance(a, PrepareIncoming):
            # The target prepares only while, as far as it has been told, the migration
            # is begun: an abort it has not heard of yet (the source cancelled while its
            # offer was on the way) is answered by DiscardIncoming when it arrives.
            told = self.facts[: self.cursor[TGT]]
            assert node == TGT and self.mig_state() in ("begun", "aborted")
            assert not any(isinstance(f, (LedgerAborted, LedgerCommitted)) for f in told)
            self.tgt_prepared = True
            if self.tgt_content is None:
                self.tgt_content = -1
        elif isinstance(a, Verify):
            assert node == TGT
            self.verify_pending = True
        elif isinstance(a, LoadDevice):
            # the device state loads beside the commit, into a copy that does not run yet
            assert node == TGT and self.tgt_prepared, "loaded into a copy never prepared"
            assert self.src_fenced and self.tgt_content == self.fenced_content, \
                "loaded before the root matched the fenced copy"
        elif isinstance(a, StartAtTarget):
            assert node == TGT and self.mig_state() == "committed", "started before the commit"
            assert a.epoch == self.ledger.epoch(VM), "started with another epoch than the ledger's"
            self.tgt_started = a.epoch
        elif isinstance(a, DiscardIncoming):
            assert node == TGT and self.mig_state() == "aborted", "discarded without an abort"
            self.tgt_prepared = False
        else:
            raise AssertionError(f"unknown action {a!r}")

    # ------------------------------------------------------------------ the world moves

    def deliver_message(self, index: int, duplicate: bool = False) -> None:
        src, dst, msg = self.net[index % len(self.net)]
        if not duplicate:
            self.net.remove((src, dst, msg))
        if self.partitioned or not self.up[dst]:
            return
        self.feed(dst, Received(src, wire.decode(wire.encode(msg))))

    def finish_job(self, dirty_pages: int, seconds: float, fail: bool = False) -> None:
        job = self.jobs.pop(0)
        if fail or self.partitioned or not self.up[TGT] or not self.tgt_prepared:
            self.feed(SRC, ActionFailed("send round", "the bulk transfer broke"))
            return
        self.tgt_content = job.content
        pages = 96 if job.round == 1 else max(1, dirty_pages)
        self.feed(SRC, TransferProgress(job.round, pages * 4096 // 2))
        self.feed(SRC, RoundSent(job.round, pages, pages * 4096, pages * 1024, seconds,
                                 0 if job.final else dirty_pages))

    def finish_fence(self) -> None:
        self.fence_pending = False
        assert self.fenced_content is not None
        self.feed(SRC, SourceFenced(root_of(self.fenced_content)))

    def finish_verify(self) -> None:
        self.verify_pending = False
        content = self.tgt_content if self.tgt_content is not None else -1
        self.feed(TGT, TargetVerified(root_of(content)))

    def write(self) -> None:
        if self.src_running:
            self.content += 1

    def fire_next_timer(self) -> bool:
        due = sorted((at, node, repr(key), key) for node in (SRC, TGT) if self.up[node]
                     for key, at in self.timers[node].items())
        if not due:
            return False
        at, node, _, key = due[0]
        self.now = max(self.now, at)
        del self.timers[node][key]
        self.feed(node, TimerFired(key))
        return True

    def crash(self, node: str) -> None:
        if not self.up[node]:
            return
        self.up[node] = False
        self.sessions[node] = None
        self.timers[node].clear()
        self.inbox[node].clear()
        other = TGT if node == SRC else SRC
        if node == SRC:
            self.src_running = False  # the VM dies with its node
            self.src_throttle = 0  # and its throttle with the node's process
            self.jobs.clear()
            self.fence_pending = False
        else:
            self.verify_pending = False
            self.jobs.clear()
        self.feed(other, PeerDown(node))

    def restart(self, node: str) -> None:
        if self.up[node]:
            return
        self.up[node] = True
        self.cursor[node] = len(self.facts)  # the replica catches up before sessions restore
        data = self.store[node].get(record_key(MID))
        mig = self.ledger.migrations.get(MID)
        if node == SRC and self.ledger.owner(VM) == SRC and not self.src_fenced:
            self.src_running = True  # the node boots the VMs it owns that are not fenced
        if data is not None:
            session, actions = restore(data, mig, self.now, self.ledger.policy)
            self.sessions[node] = session
            self.apply(node, actions)
        elif node == TGT and mig is not None and mig.state == "begun":
            session, actions = TargetSession.from_ledger(TGT, MID, VM, SRC, mig.epoch, LIMITS,
                                                         self.now)
            self.sessions[TGT] = session
            self.apply(TGT, actions)
            if mig.announced:
                self.feed(TGT, LedgerRootAnnounced(MID, mig.announced))
        other = TGT if node == SRC else SRC
        self.feed(other, PeerUp(node))

    def set_partition(self, on: bool) -> None:
        if on == self.partitioned:
            return
        self.partitioned = on
        for node, other in ((SRC, TGT), (TGT, SRC)):
            if self.up[other]:
                self.feed(node, PeerDown(other) if on else PeerUp(other))

    def change_policy(self, v3_percent: int, kill: bool) -> None:
        policy = SetPolicy(v3_percent, (), (), kill)
        self._execute("dc1", ChangePolicy(self.ops.authorize(policy, self.now)))
        self.feed(SRC, PolicyChanged(policy))

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        owner = self.ledger.owner(VM)
        epoch = self.ledger.epoch(VM)
        assert owner in (SRC, TGT)
        assert epoch is not None and epoch >= self.max_epoch, "the epoch went back"
        self.max_epoch = epoch
        assert not (self.src_running and self.tgt_started is not None), "two running copies"
        if self.src_running:
            assert owner == SRC, "the VM runs at a DC that does not own it"
        if self.tgt_started is not None:
            assert owner == TGT and self.tgt_started == epoch
        state = self.mig_state()
        for node in (SRC, TGT):
            s = self.sessions[node]
            if s is None:
                continue
            if s.phase is Phase.COMMITTED:
                assert state == "committed"
            if s.phase is Phase.ABORTED:
                assert state == "aborted"
            if s.phase is Phase.REFUSED:
                assert state in (None, "begun", "aborted")

    # ------------------------------------------------------------------ quiescence

    def settle(self, max_steps: int = 5000) -> None:
        """Heal everything, then run to the end in FIFO order; the migration must end
        committed or aborted in the ledger, with the VM running at exactly its owner."""
        self.set_partition(False)
        for node in (SRC, TGT):
            self.restart(node)
        for _ in range(max_steps):
            if not self.step_forward(time_passes=True):
                break
        self.check_final()

    def step_forward(self, time_passes: bool) -> bool:
        """The next thing that would happen with no fault: the oldest ledger command,
        fact, reply, message or driver job; else (if ``time_passes``) the next timer."""
        if self.ledger_queue:
            self.execute_next(0)
        elif any(self.up[n] and self.cursor[n] < len(self.facts) for n in (SRC, TGT)):
            node = SRC if self.up[SRC] and self.cursor[SRC] < len(self.facts) else TGT
            self.deliver_fact(node)
        elif any(self.inbox.values()):
            node = SRC if self.inbox[SRC] else TGT
            self.feed(node, self.inbox[node].pop(0))
        elif self.net:
            self.deliver_message(0)
        elif self.fence_pending:
            self.finish_fence()
        elif self.verify_pending:
            self.finish_verify()
        elif self.jobs:
            self.finish_job(dirty_pages=2, seconds=1.0)
        elif self.done() or not time_passes:
            return False
        else:
            return self.fire_next_timer()
        return True

    def done(self) -> bool:
        s, t = self.sessions[SRC], self.sessions[TGT]
        return bool(s and s.done and (t is None or t.done) and self.mig_state() != "begun")

    def check_final(self) -> None:
        state = self.mig_state()
        src = self.sessions[SRC]
        assert src is not None and src.done, f"the source did not finish: {src and src.phase}"
        tgt = self.sessions[TGT]
        if state is None:
            assert src.phase is Phase.REFUSED
            assert self.src_running
            return
        assert state in ("committed", "aborted"), f"the migration ended {state} in the ledger"
        if tgt is not None:
            assert tgt.done
        if state == "committed":
            assert src.phase is Phase.COMMITTED
            assert self.tgt_started == self.ledger.epoch(VM) == 1
            assert not self.src_running and self.src_retired
            assert self.tgt_content == self.fenced_content, "the target holds other content"
        else:
            assert src.phase is Phase.ABORTED
            assert self.src_running and not self.src_fenced
            assert self.src_throttle == 0, "the aborted migration left its VM throttled"
            assert self.tgt_started is None
            assert not self.tgt_prepared, "the target kept its incoming copy after the abort"
            assert self.ledger.owner(VM) == SRC and self.ledger.epoch(VM) == 0


# --------------------------------------------------------------------------- interleavings

NODES = st.sampled_from([SRC, TGT])


class MigrationMachine(RuleBasedStateMachine):
    """Hypothesis picks the world's next move, faults included; the world checks its
    invariants after every step and, at teardown, heals and runs to the end."""

    w: World

    @initialize(v3=st.booleans())
    def start(self, v3: bool) -> None:
        self.w = World(SetPolicy(100, (), (), False) if v3 else None)

    @precondition(lambda self: bool(self.w.ledger_queue))
    @rule(i=st.integers(0, 7))
    def execute_ledger_command(self, i: int) -> None:
        self.w.execute_next(i)

    @precondition(lambda self: bool(self.w.ledger_queue))
    @rule(i=st.integers(0, 7))
    def lose_ledger_request(self, i: int) -> None:
        self.w.ledger_queue.pop(i % len(self.w.ledger_queue))

    @rule(node=NODES)
    def deliver_ledger_fact(self, node: str) -> None:
        if self.w.up[node] and self.w.cursor[node] < len(self.w.facts):
            self.w.deliver_fact(node)

    @precondition(lambda self: bool(self.w.net))
    @rule(i=st.integers(0, 7), duplicate=st.booleans())
    def deliver_message(self, i: int, duplicate: bool) -> None:
        self.w.deliver_message(i, duplicate)

    @precondition(lambda self: bool(self.w.net))
    @rule(i=st.integers(0, 7))
    def drop_message(self, i: int) -> None:
        self.w.net.pop(i % len(self.w.net))

    @rule(node=NODES)
    def deliver_refusal(self, node: str) -> None:
        if self.w.inbox[node]:
            self.w.feed(node, self.w.inbox[node].pop(0))

    @precondition(lambda self: bool(self.w.jobs))
    @rule(dirty=st.integers(0, 400), seconds=st.floats(0.001, 20.0), breaks=st.integers(0, 9))
    def finish_round(self, dirty: int, seconds: float, breaks: int) -> None:
        self.w.finish_job(dirty, seconds, fail=breaks == 0)

    @precondition(lambda self: self.w.fence_pending)
    @rule()
    def finish_fence(self) -> None:
        self.w.finish_fence()

    @precondition(lambda self: self.w.verify_pending)
    @rule(corrupt=st.integers(0, 5))
    def finish_verify(self, corrupt: int) -> None:
        if corrupt == 0 and self.w.tgt_content is not None:
            self.w.tgt_content += 1000
        self.w.finish_verify()

    @rule(n=st.integers(1, 5))
    def workload_writes(self, n: int) -> None:
        for _ in range(n):
            self.w.write()

    @rule(n=st.integers(1, 6))
    def things_go_right(self, n: int) -> None:
        for _ in range(n):
            self.w.step_forward(time_passes=False)

    @rule()
    def fire_timer(self) -> None:
        self.w.fire_next_timer()

    @rule(node=NODES)
    def crash(self, node: str) -> None:
        self.w.crash(node)

    @rule(node=NODES)
    def restart(self, node: str) -> None:
        self.w.restart(node)

    @rule(on=st.booleans())
    def partition(self, on: bool) -> None:
        self.w.set_partition(on)

    @rule(pct=st.sampled_from([0, 50, 100]), kill=st.booleans())
    def change_policy(self, pct: int, kill: bool) -> None:
        self.w.change_policy(pct, kill)

    @invariant()
    def safe(self) -> None:
        if hasattr(self, "w"):
            self.w.check()

    def teardown(self) -> None:
        if hasattr(self, "w"):
            self.w.settle()
