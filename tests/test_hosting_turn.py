"""A core's turn taken by the delivering task (mesh.runtime.hosting.HostedCore.deliver_many):
a link reader that finds the core idle handles its frame's events itself instead of
handing them to the core task. What must still hold: one event at a time and in delivery
order, group commit (a synced write before the group's sends), timers the turn sets fire
on time, a turn is not cut by the reader's cancellation, and a core failure stops the
core task (the node), not just the link that delivered."""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import pytest
import trio

from mesh.core import Event, Persist, Send, SetTimer, TimerFired
from mesh.runtime.hosting import DRAIN_EVENTS, CoreFailed, HostedCore
from mesh.runtime.log import JsonLog
from mesh.runtime.sqlite_store import StoreFull
from tests.harness.waiting import wait_until


class _Store:
    def __init__(self, log: list[str], *, block: threading.Event | None = None) -> None:
        self.log = log
        self.block = block
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        self.put_many([(key, value)], sync)

    def put_many(self, items: list[tuple[str, bytes]], sync: bool = True) -> None:
        if self.block is not None:
            self.block.wait(10)
        self.log.append(f"write {[k for k, _ in items]}")
        self.data.update(items)

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


class _Core:
    """Records each event and the task that handled it; event n writes n (synced), then
    sends n; an event ("timer", delay) sets a timer; "boom" raises."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, str]] = []
        self.fired: list[tuple[Hashable, float]] = []

    def handle(self, now: float, event: Event) -> list[Any]:
        self.seen.append((event, trio.lowlevel.current_task().name))
        if isinstance(event, TimerFired):
            self.fired.append((event.key, now))
            return []
        if isinstance(event, tuple):
            return [SetTimer(event[1], now + event[1])]
        if event == "boom":
            raise ValueError("boom")
        n = str(event)
        return [Persist(n, n.encode(), True), Send("peer", n)]


def _hosted(core: _Core, log: list[str], store: _Store | None = None) -> HostedCore:
    def send(peer: str, message: Any) -> bool:
        log.append(f"send {message}")
        return True

    return HostedCore("c", core, ("x",), send=send, store=store or _Store(log),
                      log=JsonLog("t", None))


async def _started(nursery: trio.Nursery, hosted: HostedCore) -> None:
    nursery.start_soon(hosted.run, name="core-task")
    await wait_until(lambda: hosted._started, "the core's start")


async def test_an_idle_core_is_run_by_the_delivering_task_one_group_per_frame() -> None:
    log: list[str] = []
    core = _Core()
    hosted = _hosted(core, log)
    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        await hosted.deliver_many(["a", "b", "c"])  # type: ignore[list-item]
        # handled before deliver_many returned, in this task, as one group: one
        # synced write, then the three sends
        assert log == ["write ['a', 'b', 'c']", "send a", "send b", "send c"]
        me = trio.lowlevel.current_task().name
        assert [task for _, task in core.seen] == [me] * 3
        nursery.cancel_scope.cancel()


async def test_while_a_turn_is_taken_deliveries_queue_and_keep_their_order() -> None:
    log: list[str] = []
    release = threading.Event()
    core = _Core()
    hosted = _hosted(core, log, _Store(log, block=release))
    hosted._write_cost[True] = 1.0  # the synced write goes to a thread, and blocks there
    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        nursery.start_soon(hosted.deliver_many, ["a"], name="reader-1")
        await wait_until(lambda: len(core.seen) == 1, "reader-1's turn")
        nursery.start_soon(hosted.deliver_many, ["b", "c"], name="reader-2")
        await wait_until(lambda: hosted._queued == 2, "reader-2's frame queued")
        nursery.start_soon(hosted.deliver_many, ["d"], name="reader-3")
        await wait_until(lambda: hosted._queued == 3, "the other frames queued")
        assert [e for e, _ in core.seen] == ["a"]  # one event at a time
        release.set()
        await wait_until(lambda: len(core.seen) == 4, "every event handled")
        assert [e for e, _ in core.seen] == ["a", "b", "c", "d"]
        assert [task for _, task in core.seen][1:] == ["core-task"] * 3
        await wait_until(lambda: len(log) == 6, "every write and send")
        assert log.index("write ['a']") < log.index("send a")
        assert log.index("write ['b', 'c', 'd']") < log.index("send b")
        assert hosted._queued == 0
        # the core is idle again: the next frame is handled by its reader
        await hosted.deliver_many(["e"])  # type: ignore[list-item]
        assert core.seen[-1] == ("e", trio.lowlevel.current_task().name)
        nursery.cancel_scope.cancel()


async def test_a_timer_set_in_a_delivering_task_turn_fires_on_time() -> None:
    core = _Core()
    hosted = _hosted(core, [])
    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        await hosted.deliver_many([("timer", 30.0)])  # type: ignore[list-item]
        set_at = trio.current_time()
        await hosted.deliver_many([("timer", 0.05)])  # type: ignore[list-item]
        # the core task waits for the 30 s timer; the turn must move its wait
        await wait_until(lambda: core.fired, "the 50 ms timer", timeout=5.0)
        assert core.fired[0][0] == 0.05
        assert core.fired[0][1] - set_at < 5.0
        assert core.seen[-1][1] == "core-task"
        nursery.cancel_scope.cancel()


async def test_a_cancelled_reader_still_finishes_its_turn_writes_and_sends() -> None:
    log: list[str] = []
    release = threading.Event()
    hosted = _hosted(_Core(), log, _Store(log, block=release))
    hosted._write_cost[True] = 1.0  # a write in a thread: the turn waits there
    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        with trio.CancelScope() as reader:
            async def cancel_soon() -> None:
                await trio.sleep(0.05)
                reader.cancel()
                release.set()
            nursery.start_soon(cancel_soon)
            # a frame of more than one group: the second group's write would be
            # the first schedule point after the cancellation
            frame = [str(n) for n in range(DRAIN_EVENTS + 1)]
            await hosted.deliver_many(frame)  # type: ignore[arg-type]
        # the link ended mid-turn, but both groups were written and their sends queued
        first, second = frame[:DRAIN_EVENTS], frame[DRAIN_EVENTS:]
        assert log == [f"write {first}", *(f"send {n}" for n in first),
                       f"write {second}", *(f"send {n}" for n in second)]
        assert not hosted._turn.locked()
        nursery.cancel_scope.cancel()


async def test_a_core_failure_in_a_delivering_task_turn_stops_the_core_task() -> None:
    hosted = _hosted(_Core(), [])
    delivered = False
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await _started(nursery, hosted)
            await hosted.deliver_many(["boom"])  # type: ignore[list-item]
            delivered = True  # the delivering task (a link reader) does not fail ...
            await trio.sleep(10)  # ... the core task raises, which ends this nursery
    assert delivered
    assert raised.group_contains(CoreFailed, match="boom")


async def test_an_idle_cores_invocation_runs_in_the_invoking_task() -> None:
    log: list[str] = []
    core = _Core()
    hosted = _hosted(core, log)
    ran_in: list[str] = []

    def fn(c: Any, now: float) -> list[Any]:
        ran_in.append(trio.lowlevel.current_task().name)
        return [Persist("k", b"v", True), Send("peer", "x")]

    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        await hosted.invoke(fn, "submit")
        # run, written and sent before invoke returned, in this task (no hand-off)
        assert ran_in == [trio.lowlevel.current_task().name]
        assert log == ["write ['k']", "send x"]
        nursery.cancel_scope.cancel()


async def test_an_invocation_while_a_turn_is_taken_queues_behind_the_deliveries() -> None:
    log: list[str] = []
    release = threading.Event()
    core = _Core()
    hosted = _hosted(core, log, _Store(log, block=release))
    hosted._write_cost[True] = 1.0  # the synced write goes to a thread, and blocks there
    order: list[str] = []

    def fn(c: Any, now: float) -> list[Any]:
        order.append(f"invoked after {[e for e, _ in core.seen]}")
        return []

    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        nursery.start_soon(hosted.deliver_many, ["a"], name="reader-1")
        await wait_until(lambda: len(core.seen) == 1, "reader-1's turn")
        nursery.start_soon(hosted.deliver_many, ["b"], name="reader-2")
        await wait_until(lambda: hosted._queued == 1, "reader-2's frame queued")
        nursery.start_soon(hosted.invoke, fn, "submit", name="caller")
        await wait_until(lambda: hosted._queued == 2, "the invocation queued")
        assert order == []
        release.set()
        await wait_until(lambda: order, "the invocation")
        assert order == ["invoked after ['a', 'b']"]
        nursery.cancel_scope.cancel()


async def test_a_core_failure_in_an_invoking_task_turn_stops_the_core_task() -> None:
    hosted = _hosted(_Core(), [])

    def fn(c: Any, now: float) -> list[Any]:
        raise ValueError("bad invocation")

    returned = False
    with pytest.raises(BaseExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            await _started(nursery, hosted)
            await hosted.invoke(fn, "submit")
            returned = True  # the caller returns, as when the core task ran it ...
            await trio.sleep(10)  # ... and the core task raises, which ends this nursery
    assert returned
    assert raised.group_contains(CoreFailed, match="bad invocation")


async def test_events_before_the_start_hook_wait_for_it() -> None:
    order: list[str] = []

    class _Started(_Core):
        def start(self, now: float) -> list[Any]:
            order.append("start")
            return []

        def handle(self, now: float, event: Event) -> list[Any]:
            order.append(str(event))
            return []

    hosted = _hosted(_Started(), [])
    async with trio.open_nursery() as nursery:
        await hosted.deliver_many(["a"])  # type: ignore[list-item]
        nursery.start_soon(hosted.run)
        await wait_until(lambda: len(order) == 2, "start, then the event")
        assert order == ["start", "a"]
        nursery.cancel_scope.cancel()



async def test_single_deliveries_of_the_peer_table_go_to_the_core_task() -> None:
    # PeerUp / PeerDown are delivered under the peer table's lock: never a turn there
    core = _Core()
    hosted = _hosted(core, [])
    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        await hosted.deliver("a")  # type: ignore[arg-type]
        await wait_until(lambda: core.seen, "the event handled")
        assert core.seen == [("a", "core-task")]
        nursery.cancel_scope.cancel()


async def test_a_write_refused_by_a_full_disk_waits_for_room_and_nothing_leaves_before_it(
        ) -> None:
    """StoreFull (nothing kept): the turn makes the same write again after a back-off
    and the sends that follow it leave only once it is in; the core does not fail."""
    log: list[str] = []

    class FullStore(_Store):
        refusals = 2

        def put_many(self, items: list[tuple[str, bytes]], sync: bool = True) -> None:
            if self.refusals:
                self.refusals -= 1
                self.log.append("full")
                raise StoreFull("node.sqlite3: database or disk is full")
            super().put_many(items, sync)

    core = _Core()
    hosted = _hosted(core, log, FullStore(log))
    async with trio.open_nursery() as nursery:
        await _started(nursery, hosted)
        await hosted.deliver_many(["a"])  # type: ignore[list-item]
        assert log == ["full", "full", "write ['a']", "send a"]
        nursery.cancel_scope.cancel()
