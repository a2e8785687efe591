"""The node's VMs brought in line with the ledger, after every change of the ledger.

Two things the ledger can decide while no request of this node waits for it:

- **a register that committed late**: an import whose register the API stopped waiting
  for ("pending, id X") and that the ledger executed afterwards leaves a *staged* VM
  (STOPPED, never run here) that the ledger gives to this DC: it is started at the
  ledger's epoch, as the import would have done;
- **a delete**: a VM the ledger no longer has and lists as deleted at an epoch at least
  this copy's is stopped and its files removed, wherever it was (running at its owner,
  retired at a former source). A STOPPED copy is left alone: it may be a new import of
  the name, staged and not registered yet; ``DELETE /api/vms/NAME`` at its node removes
  it.

:func:`plan` is a pure function of the ledger and the local VMs; the node carries its
steps out (:meth:`federation.node.assembly.Node.reconcile`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import attrs

from consensus.ledger_state import LedgerState
from federation.vms.backend import VmInfo, VmState

__all__ = ["StartStaged", "RemoveDeleted", "plan"]


@attrs.frozen
class StartStaged:
    vm: str
    epoch: int


@attrs.frozen
class RemoveDeleted:
    vm: str
    epoch: int  # the epoch the ledger deleted it at


def plan(me: str, ledger: LedgerState, local: Iterable[VmInfo],
         busy: Collection[str] = ()) -> list[StartStaged | RemoveDeleted]:
    """What to do so that this DC's VMs agree with ``ledger``; ``busy``: VMs an operation
    of this node is handling right now (an import's copy, its register)."""
    steps: list[StartStaged | RemoveDeleted] = []
    for info in local:
        if info.name in busy:
            continue
        rec = ledger.vms.get(info.name)
        if rec is not None:
            if (info.state is VmState.STOPPED and rec.owner == me
                    and rec.migration_id is None):
                steps.append(StartStaged(info.name, rec.epoch))
            continue
        deleted = ledger.deleted.get(info.name)
        if deleted is None or info.state in (VmState.STOPPED, VmState.INCOMING):
            continue
        if info.epoch <= deleted:
            steps.append(RemoveDeleted(info.name, deleted))
    return steps
