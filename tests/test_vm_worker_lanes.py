"""The node's VM worker: one VM's actions stay in order, and a slow action of one VM does
not hold up another VM's (100 concurrent migrations queued behind one another for 30 s
with one queue per node: dwcp bench fleet)."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import trio

from federation.migration.vocabulary import Fence, Retire, StartAtTarget, Unfence
from federation.node.vm_worker import LANES, VmWorker
from mesh.runtime.log import JsonLog


class _Actions:
    """Carries out an action by recording it; VM ``slow``'s first action blocks until
    ``release`` is set. ``timings`` as VmActions keeps them: per thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: list[tuple[str, str]] = []
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()
        self._local = threading.local()

    @property
    def timings(self) -> dict[str, float]:
        return dict(getattr(self._local, "value", {}))

    def carry_out(self, action: Any) -> list[Any]:
        with self.lock:
            self.started.append((action.vm, type(action).__name__))
            self.running += 1
            self.most = max(self.most, self.running)
        self._local.value = {"n": float(len(action.vm))}
        if action.vm == "slow" and isinstance(action, Fence):
            assert self.release.wait(30), "never released"
        with self.lock:
            self.running -= 1
        return [type(action).__name__]


async def test_one_vm_in_order_and_others_beside_it() -> None:
    acts = _Actions()
    done: list[tuple[str, object]] = []
    out = io.StringIO()

    async def to_session(mid: str, reply: object) -> None:
        done.append((mid, reply))

    worker = VmWorker(acts, JsonLog("dc1", out), to_session, lambda news: None)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        worker.submit(Fence("slow", "m-slow"))
        worker.submit(Unfence("slow", "m-slow"))
        for i in range(10):
            worker.submit(Fence(f"vm{i}", f"m{i}"))
            worker.submit(Retire(f"vm{i}", f"m{i}"))
        with trio.fail_after(20):
            while len(done) < 20:  # every other VM's two actions, while "slow" blocks
                await trio.sleep(0.01)
        assert ("m-slow", "Fence") not in done
        assert ("slow", "Unfence") not in acts.started  # behind its own VM's fence
        acts.release.set()
        with trio.fail_after(20):
            while len(done) < 22:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    for vm in ["slow", *(f"vm{i}" for i in range(10))]:
        mine = [kind for v, kind in acts.started if v == vm]
        assert mine == (["Fence", "Unfence"] if vm == "slow" else ["Fence", "Retire"])
    assert 2 <= acts.most <= LANES
    # each action is logged with its own thread's timings, not another VM's
    logged = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(logged) == 22
    assert all(rec["n"] == len(rec["vm"]) for rec in logged)


async def test_a_started_guests_arrival_is_handed_to_the_node() -> None:
    """After a StartAtTarget the backend's arrival of that migration (its stop window) goes
    to the node's ``on_arrival`` (the stop-window history); another migration's does not."""
    acts = _Actions()
    arrivals = {"vm1": {"migration_id": "m1", "downtime_ms": 240.0,
                        "stop_window_ms": {"verify_ms": 1.0, "commit_ms": 30.0,
                                           "start_ms": 40.0}},
                "vm2": {"migration_id": "older", "downtime_ms": 300.0}}
    acts.backend = type("B", (), {"arrival": lambda self, vm: arrivals[vm]})()  # type: ignore[attr-defined]
    got: list[tuple[str, dict[str, Any]]] = []
    done: list[object] = []

    async def to_session(mid: str, reply: object) -> None:
        done.append(reply)

    worker = VmWorker(acts, JsonLog("dc1", io.StringIO()), to_session,  # type: ignore[arg-type]
                      lambda news: None, on_arrival=lambda vm, a: got.append((vm, a)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        worker.submit(StartAtTarget("vm1", "m1", 2))
        worker.submit(StartAtTarget("vm2", "m2", 2))
        with trio.fail_after(20):
            while len(done) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == [("vm1", arrivals["vm1"])]
