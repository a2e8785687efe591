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
  it;
- **a migration's end not carried out**: a VM still FENCED (source) or INCOMING
  (target) by a migration the ledger has decided. A node killed between persisting its
  session's outcome and carrying out its VM action comes back with a session that is
  final (restore acts on nothing final: federation.migration.restore) and a guest that
  would stay paused at the source or never start at the target. The VM's own state
  names the migration, so the step is the session's own: ``Retire`` or ``Unfence`` at
  the source, ``StartAtTarget`` (only while the ledger still gives the VM to this DC at
  the migration's epoch, nothing begun since) or ``DiscardIncoming`` at the target. They
  run on the node's VM worker, in order with the sessions' actions, and are idempotent:
  a live session's own copy of the step makes the second a no-op.

:func:`plan` is a pure function of the ledger and the local VMs; the node carries its
steps out (:meth:`federation.node.assembly.Node.reconcile`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import attrs

from consensus.ledger_state import LedgerState
from federation.migration.vocabulary import DiscardIncoming, Retire, StartAtTarget, Unfence
from federation.vms.backend import VmInfo, VmState

__all__ = ["StartStaged", "RemoveDeleted", "plan", "EndStep"]

#: A decided migration's VM step, as its session would have taken it.
EndStep = Retire | Unfence | StartAtTarget | DiscardIncoming


@attrs.frozen
class StartStaged:
    vm: str
    epoch: int


@attrs.frozen
class RemoveDeleted:
    vm: str
    epoch: int  # the epoch the ledger deleted it at


def _ended(me: str, ledger: LedgerState, info: VmInfo) -> EndStep | None:
    """The step a decided migration's session owed ``info`` (FENCED or INCOMING by it)."""
    mig = ledger.migrations.get(info.migration_id)
    if mig is None or mig.state not in ("committed", "aborted"):
        return None
    committed = mig.state == "committed"
    if info.state is VmState.FENCED and mig.source == me:
        return (Retire(info.name, mig.migration_id) if committed
                else Unfence(info.name, mig.migration_id))
    if info.state is VmState.INCOMING and mig.target == me:
        if not committed:
            return DiscardIncoming(info.name, mig.migration_id)
        rec = ledger.vms.get(info.name)
        if (rec is not None and rec.owner == me and rec.epoch == mig.epoch + 1
                and rec.migration_id is None):
            return StartAtTarget(info.name, mig.migration_id, mig.epoch + 1)
    return None


def plan(me: str, ledger: LedgerState, local: Iterable[VmInfo],
         busy: Collection[str] = ()) -> list[StartStaged | RemoveDeleted | EndStep]:
    """What to do so that this DC's VMs agree with ``ledger``; ``busy``: VMs an operation
    of this node is handling right now (an import's copy, its register)."""
    steps: list[StartStaged | RemoveDeleted | EndStep] = []
    for info in local:
        if info.name in busy:
            continue
        if info.state in (VmState.FENCED, VmState.INCOMING) and info.migration_id:
            step = _ended(me, ledger, info)
            if step is not None:
                steps.append(step)
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
