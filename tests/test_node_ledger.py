"""The node's ledger client (federation.node.ledger_client.NodeLedger): concurrent callers
are batched into one invocation of the node core, each gets its own result, and a
cancelled caller leaves nothing behind."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from consensus.ledger import LedgerResult
from federation.node.errors import LedgerTimeout, NodeError
from federation.node.ledger_client import NodeLedger


class FakeCore:
    """Stands for NodeCore.submit_many: hands out request ids (None past ``window``)."""

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self.calls: list[list[Any]] = []
        self.by_rid: dict[int, Any] = {}

    def submit_many(self, now: float, commands: list[Any]) -> tuple[list[int | None], list[Any]]:
        self.calls.append(list(commands))
        rids: list[int | None] = []
        for c in commands:
            if len(self.by_rid) >= self.window:
                rids.append(None)
                continue
            rid = len(self.by_rid) + 1
            self.by_rid[rid] = c
            rids.append(rid)
        return rids, []


class FakeRuntime:
    """``invoke`` as the runtime's: the function runs in the core's turn, a hop later
    (the core task's), or at once (``immediate``: an idle core's turn taken by the
    calling task, mesh.runtime.hosting.HostedCore.invoke)."""

    def __init__(self, core: FakeCore, immediate: bool = False) -> None:
        self.core = core
        self.immediate = immediate

    async def invoke(self, name: str, fn: Any, label: str = "") -> None:
        assert name == "node"
        if not self.immediate:
            await trio.sleep(0)
        fn(self.core, trio.current_time())


def _ledger(window: int = 1000, immediate: bool = False) -> tuple[NodeLedger, FakeCore]:
    core = FakeCore(window)
    return NodeLedger(FakeRuntime(core, immediate)), core  # type: ignore[arg-type]


async def _answer_all(ledger: NodeLedger, core: FakeCore, answered: set[int]) -> None:
    """The replica's part: every submitted command completes with a result naming it."""
    while True:
        for rid, cmd in list(core.by_rid.items()):
            if rid not in answered:
                answered.add(rid)
                ledger.done(rid, LedgerResult(True, f"done {cmd}"))
        await trio.sleep(0.001)


async def test_concurrent_callers_share_invocations_and_each_gets_its_own_result() -> None:
    ledger, core = _ledger()
    got: dict[int, LedgerResult] = {}

    async def caller(i: int) -> None:
        got[i] = await ledger.submit(f"cmd{i}")

    async with trio.open_nursery() as n:
        n.start_soon(_answer_all, ledger, core, set())
        async with trio.open_nursery() as callers:
            for i in range(20):
                callers.start_soon(caller, i)
        n.cancel_scope.cancel()
    assert {i: r.error for i, r in got.items()} == {i: f"done cmd{i}" for i in range(20)}
    # the first caller's invocation took what was queued by then, the next took the rest
    assert sum(len(c) for c in core.calls) == 20
    assert len(core.calls) < 20 and max(len(c) for c in core.calls) > 1
    assert ledger.invocations == len(core.calls)
    assert not ledger._results and not ledger._waiting and not ledger._queue


async def test_callers_woken_together_share_a_request_when_the_core_runs_it_at_once() -> None:
    """An idle core runs an invocation in the caller's task without a hop: the callers a
    batch's results wake together must still go in one invocation, not one each."""
    ledger, core = _ledger(immediate=True)
    go = trio.Event()
    got: dict[int, LedgerResult] = {}

    async def caller(i: int) -> None:
        await go.wait()  # all runnable in the same pass, as after a batch's replies
        got[i] = await ledger.submit(f"cmd{i}")

    async with trio.open_nursery() as n:
        n.start_soon(_answer_all, ledger, core, set())
        async with trio.open_nursery() as callers:
            for i in range(16):
                callers.start_soon(caller, i)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
        n.cancel_scope.cancel()
    assert len(got) == 16
    assert [len(c) for c in core.calls] == [16]


async def test_one_caller_alone_is_one_invocation_of_one_command() -> None:
    ledger, core = _ledger()
    async with trio.open_nursery() as n:
        n.start_soon(_answer_all, ledger, core, set())
        for i in range(3):
            assert (await ledger.submit(f"c{i}")).error == f"done c{i}"
        n.cancel_scope.cancel()
    assert core.calls == [["c0"], ["c1"], ["c2"]]


async def test_a_full_window_is_a_node_error_and_a_timeout_a_ledger_timeout() -> None:
    ledger, core = _ledger(window=1)

    async def time_out() -> None:
        while 1 not in core.by_rid:
            await trio.sleep(0.001)
        ledger.done(1, None)

    async with trio.open_nursery() as n:
        n.start_soon(time_out)
        with pytest.raises(LedgerTimeout, match="request 1"):
            await ledger.submit("first")
    with pytest.raises(NodeError, match="busy"):
        await ledger.submit("second")


async def test_a_cancelled_caller_leaves_nothing_behind() -> None:
    ledger, core = _ledger()
    # cancelled while waiting for its result: the late result is dropped
    with trio.move_on_after(0.01):
        await ledger.submit("waits")
    assert core.calls == [["waits"]]
    ledger.done(1, LedgerResult(True))
    assert not ledger._results and not ledger._waiting and not ledger._abandoned
    # cancelled before the core took it: never submitted
    with trio.CancelScope() as scope:
        scope.cancel()
        await ledger.submit("never")
    assert core.calls == [["waits"]] and not ledger._queue


async def test_no_ledger_says_why() -> None:
    ledger = NodeLedger(FakeRuntime(FakeCore()), "no ledger in this federation: n = 2")  # type: ignore[arg-type]
    with pytest.raises(NodeError, match="n = 2"):
        await ledger.submit("x")
