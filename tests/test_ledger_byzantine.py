"""A Byzantine DC holding a valid DC key, against the ledger (issue 15 item 3).

Every command here is what an insider DC can submit on its own: its PBFT requests
are signed by its own key, so every replica executes them. The ledger must refuse
each one that takes or changes what the DC does not own.
"""

from __future__ import annotations

from consensus.ledger import (
    BeginMigration,
    CommitMigration,
    Ledger,
    LedgerResult,
    RegisterVm,
)
from mesh import wire

DCS = ("dc-a", "dc-b", "dc-c", "dc-d")


def run(ledger: Ledger, client: str, rid: int, cmd: object) -> LedgerResult:
    return wire.decode(ledger.execute(client, rid, wire.encode(cmd)), expect=(LedgerResult,))


def test_a_target_cannot_begin_and_commit_on_its_own_to_take_a_vm() -> None:
    """dc-b names itself the target of dc-a's VM, begins and commits with any root."""
    led = Ledger(DCS)
    assert run(led, "dc-a", 1, RegisterVm("vm1", "dc-a")).ok
    begin = run(led, "dc-b", 1, BeginMigration("vm1", "dc-a", "dc-b", 0, "steal"))
    commit = run(led, "dc-b", 2, CommitMigration("steal", b"\x00" * 32))
    assert not begin.ok, "a DC that does not own the VM began its migration"
    assert not commit.ok, "a commit without a root the source announced was taken"
    assert (led.owner("vm1"), led.epoch("vm1")) == ("dc-a", 0)
