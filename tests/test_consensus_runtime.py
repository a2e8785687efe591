"""The runtime paths the PBFT replica's performance rests on: group commit of a
core's writes (synced writes durable before the sends that follow them), one
frame for a burst of messages on a link, the SQLite transaction of a group,
and the request path (a client's request goes to the primary; to everyone when
the primary's link is down)."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from consensus.pbft.durable import ReplicaLog
from consensus.pbft.messages import Request
from consensus.pbft.replica import PbftConfig, Replica
from mesh import identity, wire
from mesh.core import Event, PeerDown, PeerUp, Persist, Send
from mesh.runtime import hosting as runtime_cores
from mesh.runtime.hosting import HostedCore
from mesh.runtime.link import BUNDLE_BYTES, Link, LinkBundle
from mesh.runtime.log import JsonLog
from mesh.runtime.sqlite_store import SQLiteStore
from tests.harness.waiting import wait_until


class _Store:
    """Records the writes and, through ``log``, when they happen relative to sends."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        self.put_many([(key, value)], sync)

    def put_many(self, items: list[tuple[str, bytes]], sync: bool = True) -> None:
        self.log.append(f"write {[k for k, _ in items]} sync={sync}")
        self.data.update(items)

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


class _Core:
    """Each event n: write key n (synced unless ``sync`` is False), then send n."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync

    def handle(self, now: float, event: Event) -> list[Any]:
        n = str(event)
        return [Persist(n, n.encode(), self.sync), Send("peer", n)]


async def _run_group(sync: bool) -> list[str]:
    log: list[str] = []

    def send(peer: str, message: Any) -> bool:
        log.append(f"send {message}")
        return True

    hosted = HostedCore("c", _Core(sync), ("x",), send=send, store=_Store(log),
                        log=JsonLog("t", None))
    async with trio.open_nursery() as nursery:
        for n in ("a", "b", "c"):  # waiting before the core runs: one group
            await hosted.deliver(n)  # type: ignore[arg-type]
        nursery.start_soon(hosted.run)
        await wait_until(lambda: len(log) >= 4, "the group's write and its three sends")
        nursery.cancel_scope.cancel()
    return log


async def test_a_group_of_events_shares_one_synced_write_before_its_sends() -> None:
    assert await _run_group(sync=True) == [
        "write ['a', 'b', 'c'] sync=True", "send a", "send b", "send c"]


async def test_unsynced_writes_do_not_hold_back_the_sends() -> None:
    assert await _run_group(sync=False) == [
        "send a", "send b", "send c", "write ['a', 'b', 'c'] sync=False"]


class _TimedStore:
    """Records whether each write ran on the event loop's thread; a synced write
    advances the runtime's clock by an fsync (4 ms), an unsynced one by 10 us."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.on_loop: list[tuple[bool, bool]] = []
        self.loop_thread = threading.get_ident()

    def get(self, key: str) -> bytes | None:
        return None

    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        self.put_many([(key, value)], sync)

    def put_many(self, items: list[tuple[str, bytes]], sync: bool = True) -> None:
        self.on_loop.append((sync, threading.get_ident() == self.loop_thread))
        self.clock[0] += 0.004 if sync else 0.00001

    def keys(self, prefix: str = "") -> list[str]:
        return []


async def test_slow_synced_writes_go_to_a_thread_and_quick_unsynced_ones_stay_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    monkeypatch.setattr(runtime_cores.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(runtime_cores, "_loop_idle", lambda: False)  # other tasks are ready
    store = _TimedStore(clock)
    hosted = HostedCore("c", _Core(True), ("x",), send=lambda p, m: True, store=store,
                        log=JsonLog("t", None))
    for sync in (True, True, False, False, True, False):
        await hosted._write([Persist("k", b"v", sync)])
    # the first of each kind runs in a thread; then synced ones (4 ms, above
    # INLINE_WRITE) stay there, and unsynced ones (10 us) run on the loop, even
    # right after a synced one
    assert store.on_loop == [(True, False), (True, False), (False, False), (False, True),
                             (True, False), (False, True)]


async def test_on_an_idle_loop_writes_under_the_idle_bound_run_inline_and_slower_ones_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    monkeypatch.setattr(runtime_cores.time, "perf_counter", lambda: clock[0])
    store = _TimedStore(clock)
    hosted = HostedCore("c", _Core(True), ("x",), send=lambda p, m: True, store=store,
                        log=JsonLog("t", None))
    assert runtime_cores._loop_idle()  # this test's task is the only one
    for _ in range(3):  # 4 ms synced writes: under IDLE_INLINE_WRITE, nothing to overlap
        await hosted._write([Persist("k", b"v", True)])
    assert store.on_loop == [(True, True)] * 3
    store.on_loop.clear()
    hosted._write_cost[True] = runtime_cores.IDLE_INLINE_WRITE  # a congested disk
    await hosted._write([Persist("k", b"v", True)])
    assert store.on_loop == [(True, False)]  # never stalls the loop's keepalives


def test_sqlite_put_many_is_one_transaction_in_order(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    store.put_many([("k", b"1"), ("j", b"2"), ("k", b"3")], sync=True)
    store.put_many([("u", b"4")], sync=False)
    assert (store.get("k"), store.get("j"), store.get("u")) == (b"3", b"2", b"4")
    try:
        store.put_many([("v", b"5"), ("w", "not bytes")])  # type: ignore[list-item]
    except TypeError:
        pass
    assert store.get("v") is None  # checked before anything is written
    store.close()


def _link() -> Link:
    return Link(link_id=1, ws=None, channel=None, peer="p",  # type: ignore[arg-type]
                initiator="me", peer_incarnation=b"\0" * 16)


def test_a_burst_on_a_link_leaves_as_one_bundle_and_a_lone_message_as_itself() -> None:
    link = _link()
    msgs = [wire.encode(Request("a", i, (b"x" * 10,))) for i in range(3)]
    for m in msgs[1:]:
        assert link.enqueue(m)
    frame, carry = link._take_burst(msgs[0])
    assert carry is None and wire.decode(frame) == LinkBundle(tuple(msgs))
    alone, carry = link._take_burst(msgs[0])
    assert alone == msgs[0] and carry is None


def test_a_bundle_stops_at_its_byte_limit_and_carries_the_next_message() -> None:
    link = _link()
    big = b"y" * (BUNDLE_BYTES // 2 - 10)
    first, second, third = big, big, b"z" * 100  # the third would pass the limit
    assert link.enqueue(second) and link.enqueue(third)
    frame, carry = link._take_burst(first)
    assert wire.decode(frame) == LinkBundle((first, second)) and carry == third


def _replica(name: str) -> Replica:
    names = ["a", "b", "c", "d"]
    keys = {m: identity.Identity.from_seed(bytes([i + 1]) * 32) for i, m in enumerate(names)}
    store = _Store([])
    return Replica(name, keys[name], {m: k.public for m, k in keys.items()}, ReplicaLog(store),
                   random.Random(0), PbftConfig())


def _request_targets(actions: list[Any]) -> list[str]:
    return sorted(a.peer for a in actions if isinstance(a, Send) and a.message.body[:40].find(
        Request.wire_tag.encode()) >= 0)  # type: ignore[attr-defined]


def test_a_request_goes_to_the_primary_and_to_all_while_the_primary_is_unreachable() -> None:
    r = _replica("b")  # view 0: the primary is "a"
    r.start(0.0)
    _, actions = r.submit(0.0, b"cmd-1")
    assert _request_targets(actions) == ["a"]
    r.handle(0.1, PeerDown("a"))
    _, actions = r.submit(0.2, b"cmd-2")
    assert _request_targets(actions) == ["a", "c", "d"]
    r.handle(0.3, PeerUp("a"))
    _, actions = r.submit(0.4, b"cmd-3")
    assert _request_targets(actions) == ["a"]


def test_the_primary_going_down_relays_our_waiting_requests_to_every_backup() -> None:
    r = _replica("b")
    r.start(0.0)
    r.submit(0.0, b"cmd-1")
    actions = r.handle(0.1, PeerDown("a"))
    assert _request_targets(actions) == ["a", "c", "d"]
