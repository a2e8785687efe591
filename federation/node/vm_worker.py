"""The node's VM worker: the migration sessions' VM actions, carried out one at a time in a
worker thread by :class:`federation.vms.actions.VmActions` (fsync, hashing every page for
a root: blocking work), their replies handed back to the sessions.

One at a time: a fence, a verification and a start of one VM stay in order. The rounds
core hears when a target's incoming images are prepared (the chunks that arrived before
them are written then) and when a migration ended here (its round state goes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from federation.migration.rounds import after_vm_action
from federation.migration.vocabulary import DiscardIncoming, Retire, StartAtTarget, Unfence
from federation.node.heap import trim_heap
from federation.vms.actions import VmAction, VmActions
from mesh.runtime.log import JsonLog

__all__ = ["VmWorker"]

#: The VM steps that end a migration here (the source's retire or un-fence, the target's
#: start or discard): after them the migration's buffers are all freed, and the heap's
#: free memory goes back to the kernel (federation.node.heap).
_LAST_STEPS = (Retire, Unfence, StartAtTarget, DiscardIncoming)


class VmWorker:
    def __init__(self, vm_actions: VmActions, log: JsonLog,
                 to_session: Callable[[str, object], Awaitable[None]],
                 to_rounds: Callable[[object], None]) -> None:
        self.vm_actions = vm_actions
        self.log = log
        self._to_session = to_session
        self._to_rounds = to_rounds
        self._send, self._receive = trio.open_memory_channel[tuple[VmAction, float]](
            math.inf)

    def submit(self, action: VmAction) -> None:
        """A session's VM action (from the node core's effects; in order)."""
        self._send.send_nowait((action, time.monotonic()))

    def _carry_out(self, action: VmAction, submitted: float) -> tuple[list[Any], float]:
        """Worker thread: the action's replies, and how long it waited from its submission
        until this thread began it (in the stop window, a wait is downtime too)."""
        waited = time.monotonic() - submitted
        replies = self.vm_actions.carry_out(action)
        if isinstance(action, _LAST_STEPS):
            trim_heap()
        return replies, waited

    async def run(self) -> None:
        async for action, submitted in self._receive:
            replies, waited = await trio.to_thread.run_sync(self._carry_out, action, submitted)
            mid = action.migration_id
            self.log.event("vm_action", action=type(action).__name__, vm=action.vm,
                           migration_id=mid, replies=[type(r).__name__ for r in replies],
                           waited_s=round(waited, 4),
                           **{k: round(v, 4) for k, v in self.vm_actions.timings.items()})
            for news in after_vm_action(action, replies):
                self._to_rounds(news)
            for reply in replies:
                await self._to_session(mid, reply)
