"""Hosting one sans-I/O core under trio: its inbox, its timers, its actions.

A :class:`HostedCore` first calls the core's optional ``start(now)`` hook (as the
simulator does), then runs one task that takes events from a bounded inbox and
calls ``core.handle(trio.current_time(), event)`` for each, one at a time. The
events already waiting in the inbox (at most ``DRAIN_EVENTS``) are handled as
one *group* before their actions are executed.

Who handles a group is whoever holds the core's *turn* (a lock): the core task
for its inbox and its timers, or, when the core is idle (nothing queued, no
turn in progress), the task that delivers the events — a link reader handing
over one frame's messages (:meth:`HostedCore.deliver_many`) — or the task that
invokes work in the core's turn (:meth:`HostedCore.invoke`). That saves the
hand-off to the core task (its wake-up and one more pass of the event loop per
frame) without changing what a core sees: one event at a time, in delivery
order (while anything is queued, deliveries queue behind it), the same groups
and the same order of writes and actions. A turn that waits (a store write) is
shielded from cancellation, so a link that ends mid-turn never leaves events
handled with their writes or sends not executed; one that does not wait takes
neither the lock nor the shield, since no other task can run before it ends;
a turn never waits on the network (sends only queue on links), and a failure
in it is raised by the core task, which stops the node as before rather than
only the link that delivered. Actions of a group:

* ``Persist`` -> the group's writes go to the store in one transaction
  (``store.put_many`` where the store has it), synced if any of them asks for
  it: on the event loop while the store's recent writes were quick (under
  ``INLINE_WRITE``, or under ``IDLE_INLINE_WRITE`` when no other task is ready
  to run) and the group's values are small (``INLINE_WRITE_BYTES``), else in a
  worker thread so a slow fsync never stalls the event
  loop. Such a write completes before any other action of the group is
  executed, so a synced ``Persist`` is durable before every ``Send`` that
  follows it, as ``Persist.sync`` promises (a group whose writes are all
  unsynced sends first and writes after: those writes promise nothing to a
  crash). This is group commit (DeWitt et al., SIGMOD'84): one fsync for a
  burst of events instead of one per write. A write may become durable earlier
  than it would one event at a time, never later, and nothing the core does
  after it is seen outside before it is durable;
* ``Send`` -> ``send(peer, message)`` of the runtime (encode, queue on the peer's
  link; never blocks the core, a drop is counted by the runtime). The sends of a
  group go to the runtime together (``send_group``): each link's share leaves in
  one frame, written from the turn when the link is quiet
  (:meth:`mesh.runtime.link.Link.release`), else by its writer;
* ``SetTimer`` / ``CancelTimer`` -> a per-core timer table; a due timer is
  delivered as ``TimerFired(key)`` through the same loop, so a core sees one
  event at a time;
* ``Notify`` -> a ``notify`` log line;
* ``Offload`` -> its work runs in a worker thread (after the group's writes) while the
  core goes on handling events; its outcome comes back through the inbox as an
  ``Offloaded`` event. The cyclic garbage collector is paused while any such work runs
  (:func:`_gc_paused`);
* the host's own actions (``effects``) are barriers: the writes before one are
  durable and the actions before it executed before it runs.

:class:`Routes` maps wire message tags to the core or callback that consumes them.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import math
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from typing import Any

import attrs
import trio

from mesh.core import (
    Action,
    CancelTimer,
    Core,
    Event,
    Notify,
    Offload,
    Offloaded,
    Persist,
    Send,
    SetTimer,
    Store,
    TimerFired,
)
from mesh.runtime.log import JsonLog
from mesh.runtime.sqlite_store import StoreFull

__all__ = [
    "HostedCore", "CoreFailed", "Routes", "Handler", "Invocation", "INBOX_EVENTS",
    "DRAIN_EVENTS",
    "INLINE_WRITE",
    "IDLE_INLINE_WRITE",
    "INLINE_WRITE_BYTES",
]

#: Events waiting for one core. When full, the link readers feeding it wait, so
#: a core that falls behind slows its peers' TCP windows instead of growing
#: memory; 256 is several gossip rounds of a 64-DC federation.
INBOX_EVENTS = 256
#: Most events handled as one group before its actions run (see the module
#: docstring). A quarter of the inbox: large enough that a burst of PBFT votes
#: and requests shares one fsync and one frame per link, small enough that the
#: first event's sends wait for little: PBFT events took 0.02-0.3 ms each to
#: handle on the 2-core test machine, so a full group is 1-20 ms.
DRAIN_EVENTS = 64
#: A group's write runs on the event loop while the store's recent writes of its
#: kind (synced or not; an average over about the last 8) took less than this,
#: else in a worker thread.
#: A thread hop costs two thread wake-ups: measured on the 2-core test machine
#: under load, a hop took 1-17 ms around SQLite commits that took 0.01-0.4 ms
#: (WAL, synchronous=FULL); a write this short stalls the loop less than the hop.
INLINE_WRITE = 0.0005
#: ... unless no other task is ready to run: then nothing waits behind the loop
#: but the I/O it would poll, and a write up to this long runs inline too (a hop
#: costs two wake-ups with nothing to overlap). Measured with
#: ``dwcp bench consensus`` on the 2-core test machine, one command at a time
#: (three alternating runs each): p50 10.4-11.0 ms with every synced write in a
#: thread, 9.5-9.7 ms with this rule. Bounded so a congested disk (a fsync of
#: tens of milliseconds) never stalls the loop's keepalives and SWIM acks.
IDLE_INLINE_WRITE = 0.005
#: ... and never a write of more than this many bytes, whatever the recent writes took:
#: a state transfer's checkpoint (16 MB for 100,000 VMs) written on the loop after a
#: run of quick PBFT writes held it for seconds under load.
INLINE_WRITE_BYTES = 256 * 1024
#: A write refused because the disk is full (:class:`StoreFull`) is made again after
#: 0.25 s, doubling to at most 2 s between tries, until the disk has room.
FULL_RETRY_S = (0.25, 2.0)


Handler = Callable[[str, Any], None]
#: ``fn(core, now) -> actions``: work done in a core's turn on behalf of the node.
Invocation = Callable[[Any, float], Iterable[Action] | None]


@attrs.frozen
class _Invoke:
    fn: Invocation
    label: str
    done: trio.Event


def _loop_idle() -> bool:
    """No other task is ready to run (it would wait behind an inline write)."""
    return trio.lowlevel.current_statistics().tasks_runnable == 0


_gc_lock = threading.Lock()
#: [works running, whether the collector was enabled when the first of them began]
_gc_pause = [0, False]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while offloaded work runs (in any thread). Such
    work builds large states of acyclic objects (a restored 100,000-VM ledger is about
    1.5 million of them), so the collector's passes over the whole heap, each holding
    the interpreter lock for 100-500 ms at that size, find nothing, and while the
    worker holds the lock the event loop waits: a restore in a thread with the collector
    on let the loop's thread wait up to 191-521 ms at a time, with it off 51-76 ms
    (100,000 VMs, 2 cores under load). Reference counting frees what it always frees.

    When the last such work ends, every object alive is moved out of the collector's
    view (``gc.freeze``) before it is turned on again: the first allocations after it
    otherwise ran a full collection over the new state on the event loop (0.57 s for a
    100,000-VM ledger in process under load; in the node, 2.4 s in the step after the
    install). The price: a reference cycle among objects alive at that moment that
    later becomes garbage is not collected (acyclic objects, such as the replaced
    ledger, are freed by reference counting as always); a node restores a ledger when
    it fell a checkpoint behind, not in its steady state."""
    with _gc_lock:
        if _gc_pause[0] == 0:
            _gc_pause[1] = gc.isenabled()
            gc.disable()
        _gc_pause[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pause[0] -= 1
            if _gc_pause[0] == 0 and _gc_pause[1]:
                gc.freeze()
                gc.enable()


class CoreFailed(Exception):
    """A core raised, or returned something that is not an action: a bug in the core."""


class HostedCore:
    def __init__(
        self,
        name: str,
        core: Core,
        tags: tuple[str, ...],
        *,
        send: Callable[[str, Any], bool],
        store: Store | None,
        log: JsonLog,
        effects: Callable[[object], bool] | None = None,
        send_group: Callable[[list[Send]], None] | None = None,
    ) -> None:
        self.name = name
        #: sends a group's ``Send`` actions together (each link's share leaves as one
        #: burst, written from the turn when the link is quiet); else ``send`` each
        self._send_group = send_group
        #: the host's own actions (e.g. a node's VM work): called in action order,
        #: returns True if it took the action
        self._effects = effects
        self.core = core
        self.tags = tags
        self._send = send
        self._store = store
        self._log = log
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Event | _Invoke](INBOX_EVENTS)
        #: Whose turn it is: held by the task handling events (the core's own task, or
        #: a delivering task that found the core idle, see :meth:`deliver_many`).
        self._turn = trio.Lock()
        #: Items put in the inbox and not yet taken in a turn. While any wait, a
        #: delivering task queues too, so events keep the order they were delivered in.
        self._queued = 0
        #: The start hook has run (no event is handled before it).
        self._started = False
        #: The core task's wait for the inbox or its next timer, to move its deadline
        #: when a turn taken elsewhere set an earlier timer.
        self._wait: trio.CancelScope | None = None
        #: A failure met in a turn taken by a delivering task (the core raised, or the
        #: store did); the core task raises it, so it stops the node as it would have
        #: on the core's own task, instead of ending only the link that delivered.
        self._failed: Exception | None = None
        self._timers: dict[Hashable, int] = {}  # key -> sequence of its live entry
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self.events_handled = 0
        #: recent duration of a store write (seconds), synced and unsynced apart: an
        #: unsynced SQLite commit takes ~10 us, a synced one an fsync (4 ms on the
        #: test machine's disk), and one average made the quick ones hop to a thread
        #: too (1-17 ms under load). The first write of each kind runs in a thread
        #: unless the loop is idle.
        self._write_cost = {True: INLINE_WRITE, False: INLINE_WRITE}
        #: the core task's nursery: offloaded work (Offload) runs in its tasks
        self._nursery: trio.Nursery | None = None
        #: offloaded works started and ended, and the longest one's seconds
        self.offloads = {"started": 0, "ended": 0, "longest_s": 0.0}

    async def deliver(self, event: Event) -> None:
        """Queue ``event`` for the core task (the peer table's PeerUp / PeerDown: it
        delivers them under its lock, which a turn taken here would hold longer)."""
        await self._enqueue([event])

    async def deliver_many(self, events: list[Event]) -> None:
        """Deliver ``events`` (in order; a link reader passes one frame's messages).

        When the core is idle (started, nothing queued, no turn in progress) the
        calling task takes the core's turn and handles them itself, as one group with
        whatever reaches the inbox meanwhile: the same group commit as the core's
        own task, without the hand-off to it (two task switches per frame: the
        reader's wake-up of the core task and the core task's run). The turn is
        shielded from cancellation (a link that ends mid-turn must not leave a
        group's events handled and its writes or sends not executed), and it never
        waits on the network (sends only queue on links), so a reader taking it
        cannot be held by a slow peer any more than the core task could. Otherwise
        the events go through the inbox; a full inbox makes the caller wait, which
        is the readers' backpressure."""
        if not events:
            return
        if not self._idle():
            await self._enqueue(events)
            return
        # The turn is this task's from here. Nothing else runs before its first await, so
        # the lock and the shield are taken only when a group has to wait (a store write,
        # an invocation drained with it): a group of sends and timers, the common case
        # of a frame's messages, runs without them (their cancel scope was a tenth of a
        # message's CPU, bench.cpu_sampler on bench.loop_passes).
        rest = events
        try:
            while rest:
                chunk, rest = rest[:DRAIN_EVENTS], rest[DRAIN_EVENTS:]
                actions, invoke = self._gather(chunk)
                if invoke is None and _plain(actions):
                    self._execute_plain(actions)
                    continue
                break
            else:
                self._rearm()
                return
        except Exception as exc:  # a core bug: the node's to raise
            self._failed = exc
            self._rearm()
            return
        left = rest

        async def finish() -> None:
            await self._finish_step(actions, invoke)
            for start in range(0, len(left), DRAIN_EVENTS):
                await self._steps(left[start:start + DRAIN_EVENTS])

        await self._take_turn(finish)

    def _idle(self) -> bool:
        """Started, nothing queued, no turn in progress: a caller may take the turn."""
        return self._started and self._queued == 0 and not self._turn.locked()

    async def _take_turn(self, body: Callable[[], Awaitable[None]]) -> None:
        """Take the idle core's turn in the calling task, run ``body`` in it shielded; a
        failure in it (a core bug or a failed write) is the core task's to raise."""
        self._turn.acquire_nowait()
        try:
            with trio.CancelScope(shield=True):
                await body()
        except Exception as exc:  # a core bug or a failed write: the node's to raise
            self._failed = exc
        finally:
            self._turn.release()
            self._rearm()

    async def _enqueue(self, events: list[Event]) -> None:
        for event in events:
            self._queued += 1
            try:  # no schedule point per message of a burst while the inbox has room
                self._inbox_send.send_nowait(event)
            except trio.WouldBlock:
                try:
                    await self._inbox_send.send(event)
                except BaseException:
                    self._queued -= 1
                    raise

    def _rearm(self) -> None:
        """After a turn taken by a delivering task: wake the core task for a core
        failure, or move its wait to the next timer, which that turn may have set
        earlier."""
        if self._wait is not None:
            deadline = -math.inf if self._failed is not None else self.next_deadline()
            if self._wait.deadline != deadline:  # trio's setter re-registers it each time
                self._wait.deadline = deadline

    async def invoke(self, fn: Invocation, label: str) -> None:
        """Run ``fn(core, now)`` in this core's turn (between two events, like the
        simulator's ``World.invoke``), execute the actions it returns, then return.

        When the core is idle the calling task takes the turn itself, as a delivering
        link reader does (:meth:`deliver_many`): the node's ledger submissions
        (:class:`federation.node.ledger_client.NodeLedger`) then leave without the
        hand-off to the core task and back (two task switches and an event-loop pass
        each). The turn is shielded, and a failure in it is raised by the core task,
        as when the core task runs the invocation."""
        if self._idle():  # as in deliver_many: the lock and the shield only to wait
            try:
                actions = self._invoke_now(fn, label)
                if _plain(actions):
                    self._execute_plain(actions)
                    self._rearm()
                    return
            except Exception as exc:  # a core bug: the node's to raise
                self._failed = exc
                self._rearm()
                return
            await self._take_turn(lambda: self._execute_group(actions))
            return
        call = _Invoke(fn, label, trio.Event())
        self._queued += 1
        try:
            await self._inbox_send.send(call)
        except BaseException:
            self._queued -= 1
            raise
        await call.done.wait()

    def next_deadline(self) -> float:
        while self._heap and self._timers.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)  # a cancelled or replaced timer
        return self._heap[0][0] if self._heap else math.inf

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._run()
            finally:
                nursery.cancel_scope.cancel()

    async def _offload(self, action: Offload) -> None:
        """Run an Offload's work in a worker thread; its outcome to the core as an event.
        A node that stops meanwhile abandons the thread (its result is not wanted)."""
        def work() -> Any:
            with _gc_paused():
                return action.work()

        began = time.perf_counter()
        try:
            done = Offloaded(action.key, await trio.to_thread.run_sync(
                work, abandon_on_cancel=True))
        except Exception as exc:  # the work's failure is the core's to judge
            done = Offloaded(action.key, None, exc)
        took = time.perf_counter() - began
        self.offloads["ended"] += 1
        self.offloads["longest_s"] = max(self.offloads["longest_s"], took)
        self._log.event("offloaded", core=self.name, key=repr(action.key),
                        took_s=round(took, 3),
                        error=None if done.error is None else repr(done.error))
        await self._enqueue([done])

    async def _run(self) -> None:
        start = getattr(self.core, "start", None)
        async with self._turn:
            if callable(start):  # the optional start hook the simulator calls too
                await self._call(lambda core, now: start(now), "start")
            self._started = True
        while True:
            if self._failed is not None:
                raise self._failed
            item: Event | _Invoke | None = None
            with trio.move_on_at(self.next_deadline()) as self._wait:
                item = await self._inbox_recv.receive()
            self._wait = None
            if self._failed is not None:
                raise self._failed
            try:  # the turn; a delivering task may hold it (then it is not idle)
                self._turn.acquire_nowait()
            except trio.WouldBlock:
                await self._turn.acquire()
            try:
                if item is not None:
                    self._queued -= 1
                if isinstance(item, _Invoke):
                    try:
                        await self._call(item.fn, item.label)
                    finally:
                        item.done.set()
                elif item is not None:
                    await self._steps([item])
                else:
                    # Fire due timers one at a time: each may cancel or re-arm others.
                    while self.next_deadline() <= trio.current_time():
                        _, _, key = heapq.heappop(self._heap)
                        del self._timers[key]
                        await self._execute_group(self._handle(TimerFired(key)))
            finally:
                self._turn.release()

    async def _call(self, fn: Invocation, label: str) -> None:
        await self._execute_group(self._invoke_now(fn, label))

    def _invoke_now(self, fn: Invocation, label: str) -> list[Action]:
        try:
            actions = fn(self.core, trio.current_time())
        except Exception as exc:
            self._log.event("core_failed", core=self.name, error=repr(exc), on=label)
            raise CoreFailed(f"core {self.name!r} raised in {label}: {exc!r}") from exc
        return list(actions or ())

    def _handle(self, event: Event) -> list[Action]:
        try:
            actions = self.core.handle(trio.current_time(), event)
        except Exception as exc:
            self._log.event("core_failed", core=self.name, error=repr(exc), on=repr(event))
            raise CoreFailed(f"core {self.name!r} raised on {event!r}: {exc!r}") from exc
        self.events_handled += 1
        return actions

    async def _steps(self, first: list[Event]) -> None:
        """Handle ``first`` (at most DRAIN_EVENTS events) and the events already
        waiting behind them, then execute their actions as one group (an invocation
        waiting in between ends the group and runs after it). In the turn."""
        actions, invoke = self._gather(first)
        await self._finish_step(actions, invoke)

    def _gather(self, first: list[Event]) -> tuple[list[Action], _Invoke | None]:
        """Handle ``first`` and what waits behind it (the step's events); their actions,
        and the invocation that ended the step, if one did."""
        actions: list[Action] = []
        for event in first:
            actions.extend(self._handle(event))
        invoke: _Invoke | None = None
        for _ in range(DRAIN_EVENTS - len(first)):
            try:
                item = self._inbox_recv.receive_nowait()
            except trio.WouldBlock:
                break
            self._queued -= 1
            if isinstance(item, _Invoke):
                invoke = item
                break
            actions.extend(self._handle(item))
        return actions, invoke

    async def _finish_step(self, actions: list[Action], invoke: _Invoke | None) -> None:
        await self._execute_group(actions)
        if invoke is not None:
            try:
                await self._call(invoke.fn, invoke.label)
            finally:
                invoke.done.set()

    async def _execute_group(self, actions: list[Action]) -> None:
        """Execute ``actions``: the writes up to each barrier (a host effect, or the
        end) first, in one transaction, then the other actions in their order."""
        writes: list[Persist] = []
        deferred: list[Action] = []
        for action in actions:
            if isinstance(action, Persist):
                writes.append(action)
            elif isinstance(action, _PLAIN):
                deferred.append(action)
            else:
                await self._flush(writes, deferred)
                writes, deferred = [], []
                self._execute_effect(action)
        await self._flush(writes, deferred)

    async def _flush(self, writes: list[Persist], deferred: list[Action]) -> None:
        """Writes then actions; when no write asks for a sync (so none promises to be
        durable before what follows), the actions go first and the writes after."""
        if writes and any(w.sync for w in writes):
            await self._write(writes)
            writes = []
        self._execute_plain(deferred)
        if writes:
            await self._write(writes)

    def _execute_plain(self, deferred: list[Action]) -> None:
        """Sends, timers and log lines, in their order; the sends leave together."""
        sends: list[Send] = []
        for action in deferred:
            if isinstance(action, Send) and self._send_group is not None:
                sends.append(action)  # their order with timers and log lines is local
            else:
                self._execute(action)
        if sends:
            assert self._send_group is not None
            self._send_group(sends)

    async def _write(self, writes: list[Persist]) -> None:
        store = self._store
        if store is None:
            raise CoreFailed(
                f"core {self.name!r} persisted {writes[0].key!r} but the node has no store"
            )
        items = [(w.key, w.value) for w in writes]
        sync = any(w.sync for w in writes)
        put_many = getattr(store, "put_many", None)

        def put() -> float:
            start = time.perf_counter()
            if put_many is not None:
                put_many(items, sync)
            else:
                for w in writes:
                    store.put(w.key, w.value, w.sync)
            return time.perf_counter() - start

        cost = self._write_cost[sync]
        small = sum(len(w.value) for w in writes) <= INLINE_WRITE_BYTES
        inline = small and (cost < INLINE_WRITE or (cost < IDLE_INLINE_WRITE and _loop_idle()))
        wait = FULL_RETRY_S[0]
        while True:
            try:
                took = put() if inline else await trio.to_thread.run_sync(put)
                break
            except StoreFull as exc:
                # Nothing of the write was kept and nothing that depends on it has left
                # (the turn's sends wait for it): the core waits here until the disk has
                # room, as a stopped process would, rather than end the node.
                self._log.event("store_full", core=self.name, error=str(exc),
                                retry_s=wait)
                await trio.sleep(wait)
                wait = min(wait * 2, FULL_RETRY_S[1])
        if small:  # (a large write's time says nothing of the next PBFT write's)
            self._write_cost[sync] = cost + (took - cost) / 8

    def _execute(self, action: Action) -> None:
        if isinstance(action, Send):
            self._send(action.peer, action.message)
        elif isinstance(action, SetTimer):
            seq = next(self._seq)
            self._timers[action.key] = seq
            heapq.heappush(self._heap, (action.at, seq, action.key))
        elif isinstance(action, CancelTimer):
            self._timers.pop(action.key, None)
        elif isinstance(action, Notify):
            self._log.event("notify", core=self.name, kind=action.kind, detail=action.detail)
        elif isinstance(action, Offload):
            if self._nursery is None:
                raise CoreFailed(f"core {self.name!r} offloaded work before it started")
            self.offloads["started"] += 1
            self._nursery.start_soon(self._offload, action)

    def _execute_effect(self, action: object) -> None:
        if self._effects is not None and self._effects(action):
            return
        raise CoreFailed(f"core {self.name!r} returned {action!r}, which is not an action")


def _plain(actions: list[Action]) -> bool:
    """Only sends, timers and log lines: a group that executes without waiting."""
    for action in actions:
        if not isinstance(action, _PLAIN):
            return False
    return True


_PLAIN = (Send, SetTimer, CancelTimer, Notify, Offload)


class Routes:
    """Message tag -> consumer. A pattern ending in ``.`` is a prefix; the longest wins."""

    def __init__(self) -> None:
        self._routes: dict[str, HostedCore | Handler] = {}

    def add(self, tags: tuple[str, ...], target: HostedCore | Handler) -> None:
        for tag in tags:
            if tag in self._routes:
                raise ValueError(f"message tag {tag!r} already has a consumer")
        for tag in tags:
            self._routes[tag] = target

    def lookup(self, tag: str) -> HostedCore | Handler | None:
        target = self._routes.get(tag)
        if target is not None:
            return target
        best = ""
        for pattern in self._routes:
            if pattern.endswith(".") and tag.startswith(pattern) and len(pattern) > len(best):
                best = pattern
        return self._routes.get(best) if best else None
