"""The node's VM worker: the migration sessions' VM actions, carried out in worker threads
by :class:`federation.vms.actions.VmActions` (fsync, hashing every page for a root:
blocking work), their replies handed back to the sessions.

One at a time per VM: a fence, a verification and a start of one VM stay in order (a
*lane* per VM with actions pending). Different VMs' actions run beside each other, at
most :data:`LANES` at once: with one queue for the whole node, 100 concurrent migrations
on four DCs (``dwcp bench fleet``) left a fence waiting 23 s and a verification 27 s
behind other VMs' actions, and targets aborted migrations whose source had sent nothing
for 30 s. The rounds core hears when a target's incoming images are prepared (the chunks
that arrived before them are written then) and when a migration ended here (its round
state goes).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from federation.migration.rounds import after_vm_action
from federation.migration.vocabulary import DiscardIncoming, Retire, StartAtTarget, Unfence
from federation.node.heap import trim_heap
from federation.vms.actions import VmAction, VmActions
from federation.vms.backend import VmError
from mesh.runtime.log import JsonLog

__all__ = ["VmWorker", "LANES"]

#: VMs whose actions run at once. Most of an action is an fsync or hashing (hashlib and
#: the disk release the GIL): four keep two cores busy while two wait on the disk, and
#: bound the threads a fleet of migrations holds (trio's own default limiter is 40).
LANES = 4

#: The VM steps that end a migration here (the source's retire or un-fence, the target's
#: start or discard): after them the migration's buffers are all freed, and the heap's
#: free memory goes back to the kernel (federation.node.heap).
_LAST_STEPS = (Retire, Unfence, StartAtTarget, DiscardIncoming)


class VmWorker:
    def __init__(self, vm_actions: VmActions, log: JsonLog,
                 to_session: Callable[[str, object], Awaitable[None]],
                 to_rounds: Callable[[object], None],
                 on_arrival: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.vm_actions = vm_actions
        #: told of a guest's arrival once started here (the backend's ``arrival``: its
        #: downtime and stop window), where the backend measures one (qemu)
        self._on_arrival = on_arrival
        self.log = log
        self._to_session = to_session
        self._to_rounds = to_rounds
        self._send, self._receive = trio.open_memory_channel[tuple[VmAction, float]](
            math.inf)
        #: VM -> its actions not yet carried out, the one running first
        self._lanes: dict[str, collections.deque[tuple[VmAction, float]]] = {}
        self._limiter = trio.CapacityLimiter(LANES)

    def submit(self, action: VmAction) -> None:
        """A session's VM action (from the node core's effects; in order)."""
        self._send.send_nowait((action, time.monotonic()))

    def _carry_out(self, action: VmAction, submitted: float
                   ) -> tuple[list[Any], float, dict[str, float], dict[str, Any] | None]:
        """Worker thread: the action's replies, how long it waited from its submission
        until this thread began it (in the stop window, a wait is downtime too), the
        timings of its phases (VmActions keeps them per thread), and after a start the
        arrival it measured (None: none, or of another migration)."""
        waited = time.monotonic() - submitted
        replies = self.vm_actions.carry_out(action)
        timings = dict(self.vm_actions.timings)
        arrival = None
        if isinstance(action, StartAtTarget) and self._on_arrival is not None:
            arrival = self._arrival(action)
        if isinstance(action, _LAST_STEPS):
            trim_heap()
        return replies, waited, timings, arrival

    def _arrival(self, action: StartAtTarget) -> dict[str, Any] | None:
        get = getattr(self.vm_actions.backend, "arrival", None)
        if not callable(get):
            return None
        try:
            got = get(action.vm)
        except (VmError, OSError, ValueError):
            return None
        if not isinstance(got, dict) or got.get("migration_id") != action.migration_id:
            return None
        return got

    async def run(self) -> None:
        async with trio.open_nursery() as lanes:
            async for action, submitted in self._receive:
                lane = self._lanes.get(action.vm)
                if lane is not None:
                    lane.append((action, submitted))
                    continue
                self._lanes[action.vm] = collections.deque([(action, submitted)])
                lanes.start_soon(self._lane, action.vm)

    async def _lane(self, vm: str) -> None:
        """``vm``'s actions in order until none is left (the lane then goes; the next
        action of the VM opens a new one)."""
        lane = self._lanes[vm]
        while lane:
            action, submitted = lane[0]
            replies, waited, timings, arrival = await trio.to_thread.run_sync(
                self._carry_out, action, submitted, limiter=self._limiter)
            if arrival is not None and self._on_arrival is not None:
                self._on_arrival(action.vm, arrival)
            lane.popleft()
            mid = action.migration_id
            self.log.event("vm_action", action=type(action).__name__, vm=action.vm,
                           migration_id=mid, replies=[type(r).__name__ for r in replies],
                           waited_s=round(waited, 4),
                           **{k: round(v, 4) for k, v in timings.items()})
            for news in after_vm_action(action, replies):
                self._to_rounds(news)
            for reply in replies:
                await self._to_session(mid, reply)
        del self._lanes[vm]
