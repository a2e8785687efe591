"""A fleet-sized ledger built from its records, without executing a command per VM:
``vms`` VMs spread over the members, each moved once by a committed migration (the
records a fleet that migrated holds: about 200 bytes per VM in the snapshot, so
100,000 VMs make a snapshot of about 20 MB, past one frame's 8 MiB). Restored from
its snapshot, so every invariant a replica checks holds."""

from __future__ import annotations

from collections.abc import Sequence

from consensus.authz import OperatorTable
from consensus.ledger import Ledger
from consensus.ledger_commands import MigrationRecord, VmRecord


def fleet_ledger(members: Sequence[str], vms: int,
                 operators: OperatorTable | None = None) -> Ledger:
    ledger = Ledger(members, operators)
    n = len(members)
    for i in range(vms):
        vm = f"fleet-vm-{i:07d}"
        source, target = members[i % n], members[(i + 1) % n]
        mid = f"mig-{vm}-2"
        ledger.vms[vm] = VmRecord(vm, target, 2, None)
        ledger.migrations[mid] = MigrationRecord(
            mid, vm, source, target, 2, "committed", bytes([i % 251]) * 32,
            bytes([i % 251]) * 32, 600.0 + i, 3)
    return Ledger.restore(members, ledger.snapshot(), operators)
