"""The round lifecycle of a node: the rounds core (:mod:`federation.migration.rounds`)
hosted on the runtime, and what carries out its actions.

:class:`RoundScheduler` mounts the core as the runtime's ``"rounds"`` core for the round
messages (``data.v1.*``, ``data.v3.round``, ``data.v3.status``) and peer events, and
routes the v3 diff (``data.v3.hde``) to the v3 data plane. What the core asks is done
here:

- :class:`~federation.migration.round_events.ToSession`: handed to the migration
  session in the node core, in the order the core said it;
- the page actions: by :class:`federation.vms.actions.VmActions`, the interpreter the
  simulator uses too. Reading and writing one chunk (at most 256 KiB between an image
  mapping and a message) happens on the event loop, as the v1 data plane always did;
  planning a round and counting its dirty pages ask the backend for its dirty
  generations and may read its metadata, so they run in a worker thread;
- the ``V3*`` actions: by the v3 data plane (:mod:`federation.dataplane.v3`);
- :class:`~federation.migration.round_events.RoundReport`: the ``round_sent`` /
  ``round_failed`` log lines, and a delivered round of at least
  :data:`BANDWIDTH_SAMPLE_MIN` as a bandwidth sample of its link
  (:meth:`mesh.links.control_plane.MeshControl.record_transfer`).

Everything that answers the core — the page actions' replies, the v3 data plane's
reports, the sessions' ``SendRound``/``CancelRound``, the VM worker's
``IncomingReady``/``MigrationOver`` — goes through :class:`RoundEvents`, one ordered
queue, into the core's turn.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from federation.dataplane.v3 import V3DataPlane
from federation.migration.round_counters import TransferCounters, version_label
from federation.migration.round_events import (
    PAGE_ACTIONS,
    V3_ACTIONS,
    CountDirty,
    PlanRound,
    RoundReport,
    ToSession,
)
from federation.migration.round_messages import HDE_TAG, ROUND_TAGS
from federation.migration.rounds import RoundsCore
from federation.vms.actions import VmActions
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Runtime

__all__ = ["RoundScheduler", "RoundEvents", "BANDWIDTH_SAMPLE_MIN", "CORE"]

#: The runtime's name of the hosted rounds core.
CORE = "rounds"
#: Rounds smaller than this are not bandwidth samples: 1 MiB takes 8 ms at 1 Gbit/s,
#: the order of a round trip and of the acknowledgement window's ramp, so a smaller
#: round measures latency rather than bandwidth.
BANDWIDTH_SAMPLE_MIN = 1 << 20


class RoundEvents:
    """The ordered queue of events for the rounds core (``put`` never blocks: what is
    put is small, and bounded by the rounds in flight)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[object](math.inf)

    def put(self, event: object) -> None:
        self._send.send_nowait(event)

    async def pump(self, runtime: Runtime) -> None:
        """Hand every event to the core, those waiting together in one turn."""
        async for first in self._receive:
            batch = [first]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break

            def handle(core: RoundsCore, now: float, batch: list[object] = batch) -> list[Any]:
                return [a for event in batch for a in core.handle(now, event)]

            await runtime.invoke(CORE, handle, "round-events")


class RoundScheduler:
    def __init__(
        self,
        *,
        runtime: Runtime,
        core: RoundsCore,
        events: RoundEvents,
        vm_actions: VmActions,
        v3: V3DataPlane,
        log: JsonLog,
        to_session: Callable[[str, object], Awaitable[None]],
    ) -> None:
        self.runtime = runtime
        self.core = core
        self.events = events
        self.vm_actions = vm_actions
        self.v3 = v3
        self.log = log
        self._to_session = to_session
        self._session_send, self._session_receive = trio.open_memory_channel[
            tuple[str, object]](math.inf)
        self._nursery: trio.Nursery | None = None
        runtime.add_core(CORE, core, ROUND_TAGS, effects=self._effect)
        runtime.add_handler((HDE_TAG,), v3.on_diff)

    @property
    def counters(self) -> TransferCounters:
        """The data plane's counters (read-only for everyone but the core)."""
        return self.core.counters

    async def forget(self, migration_ids: list[str]) -> None:
        """Drop the per-migration counters of ended migrations (in the core's turn)."""
        def drop(core: RoundsCore, now: float) -> list[Any]:
            core.counters.forget(migration_ids)
            return []
        await self.runtime.invoke(CORE, drop, "forget-ended")

    async def run(self, nursery: trio.Nursery) -> None:
        """Start the tasks that feed the core and the sessions (until the node stops)."""
        self._nursery = nursery
        nursery.start_soon(self.events.pump, self.runtime)
        nursery.start_soon(self._sessions)

    def submit(self, action: object) -> None:
        """A session's ``SendRound`` or ``CancelRound`` (from the node core's effects)."""
        self.events.put(action)

    async def _sessions(self) -> None:
        async for mid, event in self._session_receive:
            await self._to_session(mid, event)

    # ------------------------------------------------------------------ the core's actions

    def _effect(self, action: object) -> bool:
        if isinstance(action, ToSession):
            self._session_send.send_nowait((action.migration_id, action.event))
        elif isinstance(action, (PlanRound, CountDirty)):
            assert self._nursery is not None, "rounds run only while the node runs"
            self._nursery.start_soon(self._in_thread, action)
        elif isinstance(action, PAGE_ACTIONS):
            for reply in self.vm_actions.carry_out_pages(action):
                self.events.put(reply)
        elif isinstance(action, V3_ACTIONS):
            self.v3.carry_out(action)
        elif isinstance(action, RoundReport):
            self._reported(action)
        else:
            return False
        return True

    async def _in_thread(self, action: PlanRound | CountDirty) -> None:
        for reply in await trio.to_thread.run_sync(self.vm_actions.carry_out_pages, action):
            self.events.put(reply)

    def _reported(self, r: RoundReport) -> None:
        version = version_label(r.version)
        if r.sent is None:
            self.log.event("round_failed", migration_id=r.migration_id, round=r.round,
                           version=r.version, error=r.error)
            return
        sent = r.sent
        self.log.event("round_sent", migration_id=r.migration_id, round=r.round,
                       version=version, pages=sent.pages, logical_bytes=sent.bytes,
                       wire_bytes=sent.wire_bytes, seconds=round(sent.seconds, 4),
                       dirty_pages=sent.dirty_pages, **r.figures)
        if sent.wire_bytes >= BANDWIDTH_SAMPLE_MIN and sent.seconds > 0 and self._nursery:
            # the round is a bandwidth sample of the link (mesh.links.estimates)
            # over the time the pages moved, not the round's preparation (the link idles
            # through that: counting it would halve a 100 Mbit/s link's estimate)
            moving = sent.move_seconds if sent.move_seconds else sent.seconds
            self._nursery.start_soon(self.runtime.invoke, "mesh", lambda c, now: c.record_transfer(
                now, r.target, sent.wire_bytes, moving), "bw-sample")
