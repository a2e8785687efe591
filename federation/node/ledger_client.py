"""The node's client of its own ledger: ``await submit(command)`` through the replica the
node core hosts, returning once f+1 replicas sent the same result."""

from __future__ import annotations

from typing import Any

import trio

from consensus.ledger import LedgerResult
from consensus.pbft.client import ClientBusy
from federation.migration.dc_core import NodeCore
from federation.node.errors import LedgerTimeout, NodeError
from mesh.runtime.node_runtime import Runtime

__all__ = ["NodeLedger"]


class NodeLedger:
    """``await submit(command)`` -> :class:`consensus.ledger.LedgerResult`; raises
    :class:`~federation.node.errors.LedgerTimeout` when the client gives up, and
    :class:`~federation.node.errors.NodeError` when the federation has no ledger
    (``no_ledger`` says why) or the client is busy. The node core calls :meth:`done`
    with every result of the node's own requests."""

    def __init__(self, runtime: Runtime, no_ledger: str = "") -> None:
        self._runtime = runtime
        self.no_ledger = no_ledger
        self._results: dict[int, LedgerResult | None] = {}
        self._waiting: dict[int, trio.Event] = {}

    def done(self, rid: int, result: LedgerResult | None) -> None:
        self._results[rid] = result
        event = self._waiting.pop(rid, None)
        if event is not None:
            event.set()

    async def submit(self, command: Any) -> LedgerResult:
        if self.no_ledger:
            raise NodeError(self.no_ledger)
        box: list[int] = []
        busy: list[str] = []

        def go(core: NodeCore, now: float) -> list[Any]:
            try:
                rid, actions = core.submit(now, command)
            except ClientBusy as exc:
                busy.append(str(exc))
                return []
            box.append(rid)
            return actions

        await self._runtime.invoke("node", go, "ledger-submit")
        if busy:
            raise NodeError(f"the ledger client is busy: {busy[0]}")
        rid = box[0]
        try:
            if rid not in self._results:
                event = trio.Event()
                self._waiting[rid] = event
                await event.wait()
            result = self._results.pop(rid)
        finally:  # a cancelled caller leaves nothing behind
            self._waiting.pop(rid, None)
            self._results.pop(rid, None)
        if result is None:
            raise LedgerTimeout(f"the ledger did not answer request {rid} in time")
        return result
