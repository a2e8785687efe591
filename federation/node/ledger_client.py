"""The node's client of its own ledger: ``await submit(command)`` through the replica the
node core hosts, returning once f+1 replicas sent the same result.

Concurrent submissions are batched the way the consensus benchmark submits (issue 14
item 5): the commands of every caller waiting when the node core takes its turn go to
it in one invocation (:meth:`federation.migration.dc_core.NodeCore.submit_many`), which
signs them together, up to ``MAX_REQUEST_COMMANDS`` per REQUEST, each with its own
request id and result. No task of its own and no timer: the first caller that finds no
invocation under way makes one (after one yield, so that the callers ready at the same
moment join it), and the callers who arrive meanwhile go with it or the next (flat
combining; Hendler et al., SPAA'10). One caller alone waits for nothing more than
before; many at once share a signature, and one check of it per replica, per eight.
"""

from __future__ import annotations

from typing import Any

import trio

from consensus.ledger import LedgerResult
from federation.migration.dc_core import NodeCore
from federation.node.errors import LedgerTimeout, NodeError
from mesh.runtime.node_runtime import Runtime

__all__ = ["NodeLedger"]


class _Queued:
    """One caller's command, until the node core took it."""

    __slots__ = ("command", "rid", "busy")

    def __init__(self, command: Any) -> None:
        self.command = command
        self.rid: int | None = None
        self.busy = False


class NodeLedger:
    """``await submit(command)`` -> :class:`consensus.ledger.LedgerResult`; raises
    :class:`~federation.node.errors.LedgerTimeout` when the client gives up, and
    :class:`~federation.node.errors.NodeError` when the federation has no ledger
    (``no_ledger`` says why) or the client is busy. The node core calls :meth:`done`
    with every result of the node's own requests."""

    def __init__(self, runtime: Runtime, no_ledger: str = "", core: str = "node") -> None:
        self._runtime = runtime
        self._core = core
        self.no_ledger = no_ledger
        self._results: dict[int, LedgerResult | None] = {}
        self._waiting: dict[int, trio.Event] = {}
        #: request ids whose caller left (cancelled): their results are dropped
        self._abandoned: set[int] = set()
        self._queue: list[_Queued] = []
        #: an invocation that takes the queue is on its way to the core
        self._taking = False
        #: set (and replaced) each time such an invocation is done
        self._taken = trio.Event()
        #: invocations of the core that submitted commands (each signs one REQUEST per
        #: MAX_REQUEST_COMMANDS of them)
        self.invocations = 0

    def done(self, rid: int, result: LedgerResult | None) -> None:
        if rid in self._abandoned:
            self._abandoned.discard(rid)
            return
        self._results[rid] = result
        event = self._waiting.pop(rid, None)
        if event is not None:
            event.set()

    async def submit(self, command: Any) -> LedgerResult:
        if self.no_ledger:
            raise NodeError(self.no_ledger)
        item = _Queued(command)
        self._queue.append(item)
        try:
            while item.rid is None and not item.busy:
                if self._taking:
                    await self._taken.wait()
                else:
                    await self._take_queue()
        except BaseException:
            if item in self._queue:  # cancelled before the core took it: never submitted
                self._queue.remove(item)
            elif item.rid is not None:
                self._abandoned.add(item.rid)
            raise
        if item.rid is None:
            raise NodeError("the ledger client is busy: its window of requests in flight "
                            "is full")
        rid = item.rid
        if rid not in self._results:
            event = trio.Event()
            self._waiting[rid] = event
            try:
                await event.wait()
            except BaseException:  # a cancelled caller leaves nothing behind
                self._waiting.pop(rid, None)
                if rid in self._results:
                    del self._results[rid]
                else:
                    self._abandoned.add(rid)
                raise
        result = self._results.pop(rid)
        if result is None:
            raise LedgerTimeout(f"the ledger did not answer request {rid} in time")
        return result

    async def _take_queue(self) -> None:
        """One invocation in the core's turn that submits every command queued by then.
        It first yields once, so the callers ready in the same pass of the event loop
        (a batch's results wake them together) queue theirs: an idle core runs the
        invocation in this task at once (:meth:`mesh.runtime.hosting.HostedCore.invoke`),
        and without the yield each would go alone, one signed REQUEST per command."""
        self._taking = True
        try:
            await trio.lowlevel.checkpoint()
            await self._runtime.invoke(self._core, self._take, "ledger-submit")
        finally:
            self._taking = False
            taken, self._taken = self._taken, trio.Event()
            taken.set()

    def _take(self, core: NodeCore, now: float) -> list[Any]:
        queue, self._queue = self._queue, []
        if not queue:
            return []
        self.invocations += 1
        rids, actions = core.submit_many(now, [q.command for q in queue])
        for q, rid in zip(queue, rids, strict=True):
            q.rid = rid
            q.busy = rid is None
        return actions
