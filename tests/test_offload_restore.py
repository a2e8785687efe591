"""A transferred checkpoint's ledger rebuilt off the replica's step
(``PbftConfig.offload_restore``, consensus.pbft.transfer): the ``Offload`` action in the
runtime (a worker thread; the event loop keeps running) and in the simulator (its
outcome later, other events first), a crash while it runs and at every write of the
install (the old checkpoint or the new one, never a mix), a refused snapshot, the node
core's reading of the restored ledger against its ordinary pass, and the snapshot
decoder that reads a large frame element by element (no C call over all of it, which
held the interpreter lock and so the event loop in the restoring thread)."""

from __future__ import annotations

import functools
import gc
import random
import time
from typing import Any

import attrs
import cbor2
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from bench.fleet_ledger import fleet_ledger
from consensus import snapshot_chunks
from consensus.ledger import Ledger, MigrationRecord, VmRecord
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.replica import Replica
from consensus.pbft.state import PendingRestore
from consensus.pbft.transfer import RESTORE, restore_ledger
from federation.migration.dc_core import NodeCore, _restored_view
from mesh import wire
from mesh.core import Event, Offload, Offloaded, Persist
from mesh.runtime.hosting import HostedCore
from mesh.runtime.log import JsonLog
from sim import partitions
from sim.hosts.pbft_cluster import PbftCluster, identity_for
from sim.store import SimStore
from tests.harness.pbft import SMALL, cluster, register_many, run_until_settled
from tests.harness.waiting import wait_until

OFFLOAD = attrs.evolve(SMALL, offload_restore=True)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(snapshot_chunks, "CHUNK", 1024)
    return 1024


def _lagging(seed: int = 1, delay: float = 0.5) -> PbftCluster:
    """n03 cut off while the others pass chunked checkpoints, then let back in."""
    c = cluster(seed, config=OFFLOAD)
    c.world.offload_delay = delay
    token = c.world.block(partitions.isolate("n03", c.names))
    register_many(c, 40, step=0.05)
    c.world.run(until=5.0)
    c.world.unblock(token)
    return c


# --------------------------------------------------------------------------- simulator


@pytest.mark.parametrize(("seed", "delay"), [(1, 0.01), (2, 0.5), (3, 3.0)])
def test_a_lagging_replica_installs_a_ledger_restored_off_its_step(
        small_chunks: int, seed: int, delay: float) -> None:
    # 3 s: six status intervals, checkpoints move on while the restore runs
    c = _lagging(seed, delay)
    run_until_settled(c)
    r = c.replica("n03")
    assert r.metrics.get("restores_offloaded", 0) >= 1
    assert r.metrics.get("state_transfers", 0) >= 1
    assert r.metrics.get("bad_state_replies", 0) == 0
    assert r.state.restoring is None
    assert r.ledger.state_digest() == c.replica("n00").ledger.state_digest()
    assert r.ledger.snapshot() == c.replica("n00").ledger.snapshot()


def _until_restoring(c: PbftCluster) -> PendingRestore:
    assert c.world.run(until=c.world.now + 30.0,
                       predicate=lambda w: c.replica("n03").state.restoring is not None)
    pending = c.replica("n03").state.restoring
    assert pending is not None
    return pending


def test_a_crash_while_the_restore_runs_keeps_the_old_checkpoint(small_chunks: int) -> None:
    c = _lagging(delay=2.0)
    before = c.replica("n03").low
    pending = _until_restoring(c)
    assert pending.seq > before
    c.world.crash("n03")  # the worker's outcome is lost with the process
    c.world.restart("n03")
    r = c.replica("n03")
    assert r.low == before and r.state.restoring is None  # nothing of it was written
    run_until_settled(c)
    r = c.replica("n03")
    assert r.ledger.state_digest() == c.replica("n00").ledger.state_digest()


def _copy(store: SimStore) -> SimStore:
    out = SimStore()
    for key in store.keys():
        value = store.get(key)
        assert value is not None
        out.put(key, value)
    out.sync()
    return out


def test_a_crash_at_every_write_of_the_install_leaves_the_old_or_the_new_checkpoint(
        small_chunks: int) -> None:
    c = _lagging(delay=2.0)
    pending = _until_restoring(c)
    r = c.replica("n03")
    store = c.world.nodes["n03"].store
    old = ReplicaLog(_copy(store)).load().checkpoint
    old_seq = 0 if old is None else old.seq
    ledger = restore_ledger(r.q.members, pending.snapshot, r.state.operators)
    actions = r.handle(c.world.now, Offloaded(RESTORE + (pending.seq,), ledger))
    writes = [a for a in actions if isinstance(a, Persist)]
    assert len(writes) > 2 and r.low == pending.seq  # chunks, then the record naming them
    seen = set()
    for k in range(len(writes) + 1):
        crashed = _copy(store)
        for w in writes[:k]:
            crashed.put(w.key, w.value, w.sync)
        crashed.crash()  # what was not synced is lost
        rec = ReplicaLog(crashed).load().checkpoint
        seq = 0 if rec is None else rec.seq
        assert seq in (old_seq, pending.seq)
        if seq == pending.seq:
            assert rec is not None and rec.snapshot == pending.snapshot
        else:
            assert (rec is None) == (old is None) and (rec is None or rec == old)
        seen.add(seq)
        # and a replica starts from it
        back = Replica("n03", identity_for("n03"), c.keys, ReplicaLog(crashed),
                       random.Random(0), OFFLOAD)
        assert back.low == seq
    assert seen == {old_seq, pending.seq}


def test_a_refused_restore_is_counted_and_the_transfer_asked_again(small_chunks: int) -> None:
    c = _lagging(delay=2.0)
    pending = _until_restoring(c)
    r = c.replica("n03")
    low = r.low
    actions = r.handle(c.world.now, Offloaded(RESTORE + (pending.seq,), None,
                                              wire.WireError("not a ledger")))
    assert r.low == low and r.state.restoring is None
    assert r.metrics["bad_state_replies"] == 1
    assert not [a for a in actions if isinstance(a, Persist)]
    assert any(type(wire.decode(a.message.body)).__name__ == "StateRequest"
               for a in actions if hasattr(a, "message"))
    # an outcome nobody waits for (superseded) changes nothing
    assert r.handle(c.world.now, Offloaded(RESTORE + (pending.seq,), None)) == []
    # a bug in the restore is not taken for a peer's fault: it stops the core
    r.state.restoring = pending
    with pytest.raises(KeyError):
        r.handle(c.world.now, Offloaded(RESTORE + (pending.seq,), None, KeyError("bug")))


# --------------------------------------------------------------------------- node core


def _ledger_with_migrations(members: list[str], me: str) -> bytes:
    """A snapshot whose migrations include some begun towards ``me`` (target sessions)."""
    base = fleet_ledger(members, 40)
    for i in range(6):
        vm, mid = f"fresh-{i}", f"mig-fresh-{i}"
        source = members[i % 3]
        target = me if i % 2 == 0 else members[(i + 1) % 3]
        base.vms[vm] = VmRecord(vm, source, 1, mid)
        base.migrations[mid] = MigrationRecord(mid, vm, source, target, 1, "begun",
                                               b"", b"", 0.0, 3)
    return Ledger.restore(members, base.snapshot()).snapshot()


def _core(c: PbftCluster, me: str) -> NodeCore:
    rep = Replica(me, identity_for(me), c.keys, ReplicaLog(SimStore()), random.Random(7),
                  OFFLOAD)
    core = NodeCore(me, rep, on_ledger_done=lambda rid, res: None, mode_of=lambda dst: None)
    core.start(0.0)
    return core


def test_the_node_core_reads_a_restored_ledger_as_its_ordinary_pass_does() -> None:
    c = cluster(config=OFFLOAD)
    me = "n03"
    snap = _ledger_with_migrations(list(c.names), me)
    outcomes = []
    for fast in (True, False):
        core = _core(c, me)
        st_ = core.replica.state
        st_.restoring = PendingRestore(8, (), snap, None)
        work = functools.partial(restore_ledger, st_.q.members, snap, st_.operators)
        result: Any = _restored_view(me, 8, work) if fast else work()
        actions = core.handle(1.0, Offloaded(RESTORE + (8,), result))
        assert core.replica.last_exec == 8
        outcomes.append((repr(actions), sorted(core.sessions), dict(core._seen)))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][1]) == 3  # the target sessions of the three begun towards n03


# --------------------------------------------------------------------------- runtime


class _OffloadingCore:
    """On "go" offloads ``work``; keeps the outcomes it is handed."""

    def __init__(self, work: Any) -> None:
        self.work = work
        self.done: list[Offloaded] = []

    def handle(self, now: float, event: Event) -> list[Any]:
        if event == "go":
            return [Offload(("t", 1), self.work)]
        if isinstance(event, Offloaded):
            self.done.append(event)
        return []


def _spin(seconds: float) -> int:
    """Pure-Python work (it holds the interpreter lock but lets it go between bytecodes)."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += sum(range(100))
    return n


async def _run_offload(work: Any) -> tuple[_OffloadingCore, float, float]:
    core = _OffloadingCore(work)
    hosted = HostedCore("c", core, ("x",), send=lambda peer, m: True, store=None,
                        log=JsonLog("t", None))
    lag = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hosted.run)
        await wait_until(lambda: hosted._started, "the core's start")
        began = time.perf_counter()
        await hosted.deliver_many(["go"])  # type: ignore[list-item]
        while not core.done:
            t = time.perf_counter()
            await trio.sleep(0.005)
            lag = max(lag, time.perf_counter() - t - 0.005)
        took = time.perf_counter() - began
        nursery.cancel_scope.cancel()
    return core, lag, took


async def test_the_runtime_runs_an_offload_in_a_thread_while_the_loop_goes_on() -> None:
    core, lag, took = await _run_offload(lambda: _spin(0.6))
    assert len(core.done) == 1 and core.done[0].key == ("t", 1)
    assert isinstance(core.done[0].result, int) and core.done[0].error is None
    # the loop ran its 5 ms sleeps throughout: on main's inline restore it would have
    # waited the whole work (0.6 s) at once
    assert took >= 0.6 and lag < took / 2
    assert gc.isenabled()  # the collector is back on once the work ended
    assert gc.get_freeze_count() > 0  # and what was alive then is out of its passes
    gc.unfreeze()  # (this test process's objects back to the collector)


async def test_an_offload_that_raises_reaches_the_core_as_its_error() -> None:
    def bad() -> None:
        raise wire.WireError("no")

    core, _, _ = await _run_offload(bad)
    assert core.done[0].result is None and isinstance(core.done[0].error, wire.WireError)
    assert gc.isenabled()
    gc.unfreeze()


# --------------------------------------------------------------------------- decoder


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.binary(max_size=40)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=120)


@given(_values, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
       st.integers(0, 3), st.booleans())
def test_the_piecewise_load_takes_exactly_what_the_whole_load_takes(
        value: Any, flips: list[tuple[int, int]], cut: int, canonical: bool) -> None:
    data = bytearray(cbor2.dumps(value, canonical=canonical))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    raw = bytes(data[:max(1, len(data) - cut)])
    whole = wire._canonical_load(raw)
    assert wire._canonical_load_pieces(raw) == whole
    assert wire._canonical_load_pieces(raw, levels=0) == whole


def test_a_ledger_snapshot_is_read_piecewise_as_a_whole() -> None:
    snap = fleet_ledger(["a", "b", "c", "d"], 2_000).snapshot()
    assert len(snap) > wire.FAST_MAX  # decode_large's own path
    assert wire._canonical_load_pieces(snap) == wire._canonical_load(snap)
    assert Ledger.restore(["a", "b", "c", "d"], snap).snapshot() == snap
