"""Random interleavings of one migration against the real ledger state machine.

Hypothesis chooses what happens next: ledger commands executing (or being
lost), ledger facts reaching each side, control messages delivered, dropped
or duplicated, rounds finishing or breaking, the workload writing, the
target's copy being corrupted, partitions, crashes and restarts from the
persisted records, rollout policy changes and timers firing. After every step
the world checks its invariants (tests/test_migration_world.py: one owner,
epochs only grow, never two running copies, the target never starts before
the commit, the fence precedes the final round); at the end it heals
everything and requires the migration to end COMMITTED or ABORTED in the
ledger with the VM running at exactly its owner, and, if committed, holding
the content the source had at the fence.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from consensus.ledger import SetPolicy
from tests.test_migration_world import SRC, TGT, World

NODES = st.sampled_from([SRC, TGT])


class MigrationMachine(RuleBasedStateMachine):
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


MigrationMachine.TestCase.settings = settings(
    settings.default, stateful_step_count=50, max_examples=settings.default.max_examples
)
TestMigrationInterleavings = MigrationMachine.TestCase
