"""The two-DC migration world (tests/harness/migration_world.py): seeded plain paths,
then random interleavings of one migration against the real ledger state machine.

In the interleavings hypothesis chooses what happens next: ledger commands executing
(or being lost), ledger facts reaching each side, control messages delivered, dropped
or duplicated, rounds finishing or breaking, the workload writing, the target's copy
being corrupted, partitions, crashes and restarts from the persisted records, rollout
policy changes and timers firing. After every step the world checks its invariants (one
owner, epochs only grow, never two running copies, the target never starts before the
commit, the fence precedes the final round); at the end it heals everything and
requires the migration to end COMMITTED or ABORTED in the ledger with the VM running at
exactly its owner, and, if committed, holding the content the source had at the fence.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

from federation.migration.vocabulary import Phase
from tests.harness.migration_world import SRC, TGT, MigrationMachine, World


def test_happy_path_commits_and_moves_the_vm() -> None:
    w = World()
    w.settle()
    assert w.mig_state() == "committed"
    assert w.sessions[SRC].phase is Phase.COMMITTED  # type: ignore[union-attr]
    done = [n.detail for n in w.notes if n.kind == "migration.done"]
    assert {d.role for d in done} == {"source", "target"}
    assert all(d.outcome == "committed" for d in done)


def test_target_that_never_comes_back_aborts_and_vm_runs_at_source() -> None:
    w = World()
    for _ in range(3):  # begin executes, reaches both sides
        if w.ledger_queue:
            w.execute_next()
    w.deliver_fact(SRC)
    w.deliver_fact(TGT)
    w.crash(TGT)
    while w.fire_next_timer():
        while w.ledger_queue:
            w.execute_next()
        while w.cursor[SRC] < len(w.facts):
            w.deliver_fact(SRC)
        if w.sessions[SRC].done:  # type: ignore[union-attr]
            break
    assert w.mig_state() == "aborted"
    assert w.src_running and w.sessions[SRC].phase is Phase.ABORTED  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", range(3))
def test_corrupt_target_copy_never_commits(seed: int) -> None:
    w = World()
    for _ in range(200):
        if w.verify_pending:
            w.tgt_content = (w.tgt_content or 0) + 1000 + seed
            break
        if w.ledger_queue:
            w.execute_next()
        elif any(w.cursor[n] < len(w.facts) for n in (SRC, TGT)):
            w.deliver_fact(SRC if w.cursor[SRC] < len(w.facts) else TGT)
        elif w.net:
            w.deliver_message(0)
        elif w.fence_pending:
            w.finish_fence()
        elif w.jobs:
            w.finish_job(dirty_pages=1, seconds=1.0)
    assert w.verify_pending
    w.settle()
    assert w.mig_state() == "aborted"


MigrationMachine.TestCase.settings = settings(
    settings.default, stateful_step_count=50, max_examples=settings.default.max_examples
)
TestMigrationInterleavings = MigrationMachine.TestCase
