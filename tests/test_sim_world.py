"""The simulator itself: links, partitions, crashes, timers, clocks, dispatch, Byzantine hooks."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core import (
    CancelTimer,
    Notify,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from sim import partitions
from sim.hosts.counter_cores import CounterState, EchoPing, EchoPong
from sim.nemesis import Byzantine, Nemesis
from sim.network import Constant, LinkSpec, LogNormal, Normal, Uniform
from sim.rng import child_rng, child_seed
from sim.store import SimStore
from sim.world import SimError, SimNode, World


class Recorder:
    """A core that records what it gets and sends what it is told."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any, float]] = []
        self.events: list[tuple[float, Any]] = []

    def handle(self, now: float, event: Any) -> list[Any]:
        self.events.append((now, event))
        if isinstance(event, Received):
            self.got.append((event.peer, event.message, now))
        return []


def recorder_world(names: list[str], seed: int = 1, **kw: Any) -> World:
    world = World(seed, **kw)
    for name in names:
        world.add_node(name, lambda node: node.mount("rec", Recorder(), accepts=("sim.echo.",)))
    return world


def send(world: World, src: str, dst: str, seq: int) -> None:
    world.invoke(src, "rec", lambda core, now: [Send(dst, EchoPing(seq, float(now)))], "send")


def rec(world: World, name: str) -> Recorder:
    return world.nodes[name].core("rec")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- seeds


def test_child_seeds_are_stable_and_independent() -> None:
    assert child_seed(1, "link/a/b") == child_seed(1, "link/a/b")
    assert child_seed(1, "link/a/b") != child_seed(2, "link/a/b")
    assert child_seed(1, "link/a/b") != child_seed(1, "link/b/a")
    # A fixed value: the split must not depend on hash() or the platform.
    assert child_seed(0, "x") == int.from_bytes(
        __import__("hashlib").sha256(b"dwcp-sim\x000\x00x").digest()[:8], "big")
    assert child_rng(5, "a").random() == child_rng(5, "a").random()


# --------------------------------------------------------------------------- links


@pytest.mark.parametrize("reorder", [0.0, 0.5])
def test_links_are_fifo_unless_reordering(reorder: float) -> None:
    world = recorder_world(["a", "b"])
    world.set_link("a", "b", LinkSpec(latency=Normal(0.05, 0.03), reorder=reorder))
    for i in range(300):
        world.at(i * 0.001, lambda w, i=i: send(w, "a", "b", i), "send")
    world.run(until=10.0)
    seqs = [m.seq for _, m, _ in rec(world, "b").got]
    assert sorted(seqs) == list(range(300))
    inversions = sum(1 for x, y in zip(seqs, seqs[1:], strict=False) if y < x)
    if reorder:
        assert inversions > 10
    else:
        assert inversions == 0


def test_bandwidth_serializes_and_queues() -> None:
    world = recorder_world(["a", "b"])
    world.set_link("a", "b", LinkSpec(latency=Constant(0.010), bandwidth=1e6))
    for i in range(5):
        send(world, "a", "b", i)
    size = world.metrics["bytes_sent"] // 5
    world.run(until=5.0)
    times = [t for _, _, t in rec(world, "b").got]
    per_frame = size * 8 / 1e6
    for k, t in enumerate(times):
        assert t == pytest.approx((k + 1) * per_frame + 0.010)


def test_queue_limit_drops_tail() -> None:
    world = recorder_world(["a", "b"])
    world.set_link("a", "b", LinkSpec(latency=Constant(0.0), bandwidth=8e3, queue_bytes=100))
    for i in range(20):
        send(world, "a", "b", i)
    world.run(until=60.0)
    got = len(rec(world, "b").got)
    assert 1 < got < 20
    assert world.link("a", "b").queue_drops == 20 - got


@pytest.mark.parametrize("dist,mean,stdev", [
    (Normal(0.050, 0.005), 0.050, 0.005),
    (Uniform(0.010, 0.030), 0.020, 0.020 / math.sqrt(12)),
    (LogNormal(0.040, 0.5), 0.040 * math.exp(0.125),
     0.040 * math.sqrt((math.exp(0.25) - 1) * math.exp(0.25))),
    (Constant(0.020), 0.020, 0.0),
])
def test_latency_samples_match_their_distribution(dist: Any, mean: float, stdev: float) -> None:
    rng = child_rng(7, "latency-test")
    n = 20_000
    samples = [dist.sample(rng) for _ in range(n)]
    assert dist.mean == pytest.approx(mean)
    # The sample mean lies within 4 standard errors (a 1-in-15,000 false alarm, fixed seed).
    assert abs(statistics.fmean(samples) - mean) <= 4 * stdev / math.sqrt(n) + 1e-12
    assert statistics.pstdev(samples) == pytest.approx(stdev, rel=0.05, abs=1e-12)


def test_link_latency_through_the_world_matches_distribution() -> None:
    world = recorder_world(["a", "b"])
    world.set_link("a", "b", LinkSpec(latency=Normal(0.080, 0.004), reorder=1.0))
    for i in range(2000):
        world.at(i * 0.5, lambda w, i=i: send(w, "a", "b", i), "send")
    world.run(until=2000.0)
    delays = [now - m.sent_at for _, m, now in rec(world, "b").got]
    assert len(delays) == 2000
    # reorder=1.0 adds U(0, 2*mean) to every frame: mean 0.080 + 0.080.
    assert statistics.fmean(delays) == pytest.approx(0.160, rel=0.03)


def test_loss_and_duplication_rates() -> None:
    world = recorder_world(["a", "b"])
    world.set_link("a", "b", LinkSpec(latency=Constant(0.001), loss=0.2, duplicate=0.1))
    for i in range(5000):
        world.at(i * 0.01, lambda w, i=i: send(w, "a", "b", i), "send")
    world.run(until=100.0)
    link = world.link("a", "b")
    # Binomial bounds at 5 standard deviations.
    assert abs(link.lost - 1000) < 5 * math.sqrt(5000 * 0.2 * 0.8)
    assert abs(link.duplicated - 400) < 5 * math.sqrt(4000 * 0.1 * 0.9)
    assert len(rec(world, "b").got) == 5000 - link.lost + link.duplicated


# --------------------------------------------------------------------------- partitions


ALL = ["a", "b", "c", "d", "e"]


def _delivered_pairs(blocked: set[tuple[str, str]]) -> set[tuple[str, str]]:
    world = recorder_world(ALL)
    world.block(blocked)
    for src in ALL:
        for dst in ALL:
            if src != dst:
                send(world, src, dst, 0)
    world.run(until=5.0)
    return {(peer, name) for name in ALL for peer, _, _ in rec(world, name).got}


@pytest.mark.parametrize("shape", ["halves", "isolate", "bridge", "ring", "one_way", "cut1",
                                   "groups"])
def test_partition_blocks_exactly_the_configured_directions(shape: str) -> None:
    rng = child_rng(3, "shape")
    pairs = {
        "halves": lambda: partitions.halves(ALL, rng),
        "isolate": lambda: partitions.isolate("c", ALL),
        "bridge": lambda: partitions.bridge(ALL, rng),
        "ring": lambda: partitions.ring(ALL, rng),
        "one_way": lambda: partitions.one_way(["a", "b"], ["c", "d", "e"]),
        "cut1": lambda: partitions.cut("a", "e", both=False),
        "groups": lambda: partitions.groups([["a"], ["b", "c"], ["d"]]),
    }[shape]()
    everything = {(s, d) for s in ALL for d in ALL if s != d}
    assert pairs and pairs < everything
    assert _delivered_pairs(pairs) == everything - pairs


def test_partition_shapes() -> None:
    rng = child_rng(1, "shapes")
    bridge = partitions.bridge(ALL, rng)
    middle = [n for n in ALL if not any(n in p for p in bridge)]
    assert len(middle) == 1
    ring = partitions.ring(ALL)
    for n in ALL:
        assert sum(1 for m in ALL if m != n and (n, m) not in ring) == 2
    three = partitions.groups([["a", "b"], ["c"], ["d"]])
    assert ("a", "b") not in three and ("a", "c") in three and ("c", "d") in three
    assert not any("e" in pair for pair in three)
    one_way = partitions.one_way(["a"], ["b"])
    assert one_way == {("a", "b")}
    for shape in (partitions.halves(ALL, rng), bridge, ring, partitions.isolate("a", ALL)):
        assert all((d, s) in shape for s, d in shape)


def test_partition_drops_frames_in_flight_and_blocks_nest() -> None:
    world = recorder_world(["a", "b"])
    world.set_link("a", "b", LinkSpec(latency=Constant(1.0)))
    send(world, "a", "b", 1)
    first = world.block({("a", "b")})
    second = world.block({("a", "b")})
    world.unblock(first)
    world.run(until=2.0)
    assert rec(world, "b").got == [] and world.metrics["dropped_partition"] == 1
    world.unblock(second)
    send(world, "a", "b", 2)
    world.run(until=4.0)
    assert [m.seq for _, m, _ in rec(world, "b").got] == [2]


def test_peer_up_and_down_follow_connectivity() -> None:
    world = recorder_world(["a", "b"])
    world.run(until=5.0)
    token = world.block(partitions.one_way(["a"], ["b"]))
    world.run(until=100.0)
    world.unblock(token)
    world.run(until=200.0)
    seen = [(round(t, 3), type(e).__name__) for t, e in rec(world, "a").events
            if isinstance(e, (PeerUp, PeerDown))]
    assert seen == [(1.0, "PeerUp"), (25.0, "PeerDown"), (101.0, "PeerUp")]


# --------------------------------------------------------------------------- store and crashes


@given(st.lists(st.tuples(st.sampled_from(["k1", "k2", "k3", "k4"]), st.binary(max_size=4),
                          st.booleans()), max_size=30))
def test_crash_loses_exactly_the_writes_after_the_last_sync(
        writes: list[tuple[str, bytes, bool]]) -> None:
    store = SimStore()
    for key, value, sync in writes:
        store.put(key, value, sync)
    last_sync = max((i for i, w in enumerate(writes) if w[2]), default=-1)
    survivors: dict[str, bytes] = {}
    for key, value, _ in writes[: last_sync + 1]:
        survivors[key] = value
    lost = store.crash()
    assert {k: store.get(k) for k in store.keys()} == survivors
    assert set(lost) == {k for k, _, _ in writes[last_sync + 1:]}


def test_store_rejects_bad_input() -> None:
    store = SimStore()
    with pytest.raises(TypeError, match="'k'"):
        store.put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        store.put(1, b"")  # type: ignore[arg-type]


class Persister:
    def __init__(self, store: SimStore) -> None:
        self.loaded = {k: store.get(k) for k in store.keys()}

    def start(self, now: float) -> list[Any]:
        return [SetTimer("t", now + 100.0)]

    def handle(self, now: float, event: Any) -> list[Any]:
        return [Notify("fired", now)] if isinstance(event, TimerFired) else []


def test_world_crash_and_restart_rebuild_from_synced_store() -> None:
    world = World(1)
    built: list[Persister] = []

    def build(node: SimNode) -> None:
        built.append(Persister(node.store))
        node.mount("p", built[-1])

    world.add_node("a", build)
    world.run(until=1.0)
    world.invoke("a", "p", lambda c, now: [Persist("x", b"1", sync=True),
                                           Persist("y", b"2", sync=False)], "write")
    assert world.crash("a") == ["y"]
    assert not world.invoke("a", "p", lambda c, now: [], "noop")
    world.run(until=50.0)
    world.restart("a")
    assert built[-1].loaded == {"x": b"1"}
    world.run(until=300.0)
    # The timer of the first incarnation (t=100) died with it; the new one fires at 150.
    assert [r.detail for r in world.notifications] == [150.0]


def test_a_crash_right_after_a_synced_write_stops_the_step_there() -> None:
    """SimStore.after_sync may crash the node: the rest of that step's actions (the
    next write, the notification) never happen; the world sees every Send before."""
    world = World(1)
    world.add_node("a", lambda node: node.mount("p", Persister(node.store)))
    world.run(until=1.0)
    store = world.nodes["a"].store
    seen: list[tuple[str, int]] = []

    def after_sync(key: str, barriers: int) -> None:
        seen.append((key, barriers))
        if key == "x":
            world.crash("a")

    store.after_sync = after_sync
    sends: list[str] = []
    world.on_send(lambda node, peer, msg: sends.append(f"{node}->{peer}"))
    ping = EchoPing(1, 0.0)
    world.invoke("a", "p", lambda c, now: [Persist("w", b"0", sync=True), Send("b", ping),
                                           Persist("x", b"1", sync=True),
                                           Persist("y", b"2", sync=True),
                                           Notify("after", None)], "write")
    assert seen == [("w", 1), ("x", 2)] and store.barriers == 2
    assert sends == ["a->b"] and not world.nodes["a"].up
    assert [r.kind for r in world.notifications] == []
    world.restart("a")
    assert world.nodes["a"].core("p").loaded == {"w": b"0", "x": b"1"}


# --------------------------------------------------------------------------- timers and clocks


class Clocked:
    def __init__(self) -> None:
        self.fired: list[tuple[str, float]] = []

    def start(self, now: float) -> list[Any]:
        return [SetTimer("a", now + 5), SetTimer("b", now + 6), SetTimer("a", now + 7),
                SetTimer("c", now + 8), CancelTimer("c")]

    def handle(self, now: float, event: Any) -> list[Any]:
        if isinstance(event, TimerFired):
            self.fired.append((event.key, now))
        return []


def test_timers_replace_cancel_and_use_the_local_clock() -> None:
    world = World(1, connection_events=False)
    world.add_node("a", lambda node: node.mount("c", Clocked()))
    world.nodes["a"].clock_offset = 1000.0
    world.run(until=100.0)
    core = world.nodes["a"].core("c")
    assert core.fired == [("b", 1006.0), ("a", 1007.0)]
    assert world.metrics["timers_fired"] == 2


def test_nemesis_clock_offset_shifts_now() -> None:
    world = recorder_world(["a", "b"], connection_events=False)
    Nemesis(world).clock("b", -30.0, at=1.0, until=3.0)
    for t in (0.5, 2.0, 4.0):
        world.at(t, lambda w: send(w, "a", "b", 0), "send")
    world.run(until=10.0)
    offsets = [round(now - m.sent_at, 4) for _, m, now in rec(world, "b").got]
    lat = world.link("a", "b").spec.latency.mean
    assert offsets == pytest.approx([lat, lat - 30.0, lat], abs=0.001)


# --------------------------------------------------------------------------- dispatch and errors


def test_messages_go_to_the_core_that_accepts_them() -> None:
    world = World(1, connection_events=False)

    def build(node: SimNode) -> None:
        node.mount("ping", Recorder(), accepts=(EchoPing,))
        node.mount("pong", Recorder(), accepts=("sim.echo.po",))

    world.add_node("a", build)
    world.add_node("b", build)
    world.invoke("a", "ping", lambda c, now: [Send("b", EchoPing(1, 0.0)),
                                              Send("b", EchoPong(2, 0.0)),
                                              Send("b", CounterState("a", (), False, b"0" * 16)),
                                              Send("nobody", EchoPing(3, 0.0))], "send")
    world.run(until=1.0)
    b = world.nodes["b"]
    assert [m.seq for _, m, _ in b.core("ping").got] == [1]
    assert [m.seq for _, m, _ in b.core("pong").got] == [2]
    assert world.metrics["undeliverable"] == 1 and world.metrics["unknown_peer"] == 1


def test_corrupt_frames_are_counted_and_dropped() -> None:
    world = recorder_world(["a", "b"])
    world.transmit("a", "b", b"\xff\x00garbage")
    world.run(until=1.0)
    assert world.metrics["decode_errors"] == 1 and rec(world, "b").got == []


SENT = EchoPing(7, 0.0)


def _frames_world(decode: bool) -> World:
    world = recorder_world(["a", "b", "liar"], decode_frames=decode)
    world.nodes["liar"].tamper = Byzantine(
        world.rng("byz"), equivocate=lambda dst, msg: EchoPing(99, msg.sent_at))
    world.invoke("a", "rec", lambda core, now: [Send("b", SENT)], "send")
    world.invoke("liar", "rec", lambda core, now: [Send("b", EchoPing(8, 0.0))], "send")
    world.run(until=1.0)
    return world


@pytest.mark.parametrize("decode", [True, False])
def test_frames_without_decode_deliver_the_sent_message_and_the_same_trace(
        decode: bool) -> None:
    world = _frames_world(decode)
    got = {peer: m for peer, m, _ in rec(world, "b").got}
    assert got["a"] == SENT and (got["a"] is SENT) == (not decode)
    assert got["liar"] == EchoPing(99, 0.0)  # a tampered frame is decoded either way
    assert world.trace_hash() == _frames_world(True).trace_hash()


def test_a_core_that_misbehaves_stops_the_run_with_context() -> None:
    class Broken:
        def handle(self, now: float, event: Any) -> list[Any]:
            if isinstance(event, Received):
                raise RuntimeError("boom")
            return ["not an action"] if isinstance(event, TimerFired) else []

        def start(self, now: float) -> list[Any]:
            return [SetTimer("x", now + 1)]

    world = World(1, connection_events=False)
    world.add_node("a", lambda node: node.mount("broken", Broken()))
    with pytest.raises(SimError, match="not an action"):
        world.run(until=5.0)
    world2 = World(1)
    world2.add_node("a", lambda node: node.mount("broken", Broken(), accepts=("sim.",)))
    world2.add_node("b", lambda node: node.mount("x", Recorder()))
    world2.invoke("b", "x", lambda c, now: [Send("a", EchoPing(1, 0.0))], "send")
    with pytest.raises(SimError, match="broken.*on node a raised RuntimeError: boom"):
        world2.run(until=5.0)


def test_checker_stops_at_the_first_violation_with_its_event() -> None:
    world = recorder_world(["a", "b"])
    world.add_checker("never-three", lambda w: "got 3" if any(
        m.seq == 3 for _, m, _ in rec(w, "b").got) else None)
    for i in range(6):
        world.at(float(i), lambda w, i=i: send(w, "a", "b", i), "send")
    assert world.run(until=10.0) is False
    v = world.violation
    assert v is not None and v.checker == "never-three" and v.message == "got 3"
    assert "node=b" in v.event and "seq=3" in v.event
    assert world.now < 4.0


# --------------------------------------------------------------------------- Byzantine hook


def test_byzantine_behaviours() -> None:
    world = recorder_world(["liar", "x", "y"], connection_events=False)
    liar = world.nodes["liar"]

    def per_peer(dst: str, msg: Any) -> Any:
        return EchoPing(1000 + msg.seq, msg.sent_at) if dst == "y" else None

    liar.tamper = Byzantine(world.rng("byz"), equivocate=per_peer)
    for i in range(3):
        send(world, "liar", "x", i)
        send(world, "liar", "y", i)
    world.run(until=1.0)
    assert [m.seq for _, m, _ in rec(world, "x").got] == [0, 1, 2]
    assert [m.seq for _, m, _ in rec(world, "y").got] == [1000, 1001, 1002]

    liar.tamper = Byzantine(world.rng("byz2"), replay=1.0, duplicate=1.0, max_delay=0.5)
    for i in range(3, 23):
        send(world, "liar", "x", i)
    world.run(until=5.0)
    seqs = [m.seq for _, m, _ in rec(world, "x").got[3:]]
    assert len(seqs) == 40 and max(seqs) <= 22 and len(set(seqs)) < 20

    behaviour = Byzantine(world.rng("byz3"), corrupt=1.0)
    liar.tamper = behaviour
    for i in range(50):
        send(world, "liar", "x", i)
    world.run(until=10.0)
    assert behaviour.counts["corrupted"] == 50
    assert world.metrics["decode_errors"] + len(rec(world, "x").got) - 43 == 50

    liar.tamper = Byzantine(world.rng("byz4"), silent=True)
    send(world, "liar", "x", 99)
    world.run(until=11.0)
    assert all(m.seq != 99 for _, m, _ in rec(world, "x").got)


def test_restarted_node_sees_peers_up_again_promptly() -> None:
    world = recorder_world(["a", "b"])
    world.run(until=5.0)
    world.crash("a")
    world.run(until=6.0)
    world.restart("a")
    world.run(until=10.0)
    ups = [t for t, e in rec(world, "a").events if isinstance(e, PeerUp)]
    assert ups == [pytest.approx(7.0)]
    downs = [t for t, e in rec(world, "b").events if isinstance(e, PeerDown)]
    assert downs == []  # the connection came back before b's ping timeout
