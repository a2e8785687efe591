"""Route election (mesh.links.routes)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mesh.gossip.membership import State
from mesh.links.estimates import LinkView
from mesh.links.routes import BULK, CONTROL, Route, RouteConfig, RouteElection

PEERS = ["b", "c", "d"]


class Net:
    def __init__(self) -> None:
        self.links: dict[tuple[str, str], LinkView] = {}
        self.states: dict[str, State] = {}

    def set(self, a: str, b: str, rtt: float, loss: float = 0.0, down: bool = False,
            bw: float | None = None) -> None:
        for x, y in ((a, b), (b, a)):
            self.links[(x, y)] = LinkView(rtt, loss, down, 0.0, bw)

    def state(self, name: str) -> State:
        return self.states.get(name, State.ALIVE)

    def link(self, a: str, b: str) -> LinkView | None:
        return self.links.get((a, b))


def full_mesh() -> Net:
    net = Net()
    for a, b, rtt in [("a", "b", 100.0), ("a", "c", 30.0), ("c", "b", 30.0),
                      ("a", "d", 10.0), ("d", "b", 200.0), ("c", "d", 40.0)]:
        net.set(a, b, rtt)
    return net


def settle(e: RouteElection, net: Net, ticks: int = 3) -> list:
    out = []
    for i in range(ticks):
        out += e.elect(float(i), net.state, net.link, tick=True)
    return out


def test_a_new_route_waits_k_elections_then_takes_the_least_latency() -> None:
    e, net = RouteElection("a", PEERS), full_mesh()
    assert e.elect(0.0, net.state, net.link, tick=True) == []
    assert e.elect(1.0, net.state, net.link, tick=True) == []
    out = e.elect(2.0, net.state, net.link, tick=True)
    assert e.route(CONTROL, "b") == Route(("a", "c", "b"))  # 60 ms beats 100 ms direct
    assert e.route(CONTROL, "d") == Route(("a", "d"))
    assert {"kind": "control", "dst": "b", "hops": ["a", "c", "b"], "was": None} in [
        n.detail for n in out]


def test_a_broken_route_is_replaced_at_once() -> None:
    e, net = RouteElection("a", PEERS), full_mesh()
    settle(e, net)
    net.set("c", "b", 30.0, down=True)
    e.elect(5.0, net.state, net.link, tick=False)
    assert e.route(CONTROL, "b") == Route(("a", "b"))
    net.set("a", "b", 100.0, loss=0.5)  # above the loss limit
    e.elect(6.0, net.state, net.link, tick=False)
    assert e.route(CONTROL, "b") == Route(("a", "d", "b"))


def test_suspect_and_dead_dcs_are_never_intermediates() -> None:
    e, net = RouteElection("a", PEERS), full_mesh()
    settle(e, net)
    net.states["c"] = State.SUSPECT
    e.elect(5.0, net.state, net.link, tick=False)
    assert e.route(CONTROL, "b") == Route(("a", "b"))
    assert e.route(CONTROL, "c") == Route(("a", "c"))  # a suspect destination keeps its route
    net.states["c"] = State.DEAD
    e.elect(6.0, net.state, net.link, tick=False)
    assert e.route(CONTROL, "c") is None


def test_a_better_route_wins_only_by_margin_for_k_elections() -> None:
    e, net = RouteElection("a", PEERS), full_mesh()
    net.set("c", "b", 80.0)  # via c: 110 ms, direct 100 ms
    settle(e, net)
    assert e.route(CONTROL, "b") == Route(("a", "b"))
    net.set("c", "b", 65.0)  # 95 ms: better, but within the 10 % margin
    assert settle(e, net, 5) == []
    net.set("c", "b", 30.0)  # 60 ms
    assert e.elect(10.0, net.state, net.link, tick=True) == []
    assert e.elect(11.0, net.state, net.link, tick=False) == []  # only ticks count
    assert e.elect(12.0, net.state, net.link, tick=True) == []
    assert e.elect(13.0, net.state, net.link, tick=True) != []
    assert e.route(CONTROL, "b") == Route(("a", "c", "b"))
    assert e.changes == 2 * 3 + 2  # control and bulk (no bandwidth known: latency decides)


def test_bulk_route_takes_the_widest_bottleneck_then_latency() -> None:
    e, net = RouteElection("a", PEERS), full_mesh()
    net.set("a", "b", 100.0, bw=1000.0)
    net.set("a", "c", 30.0, bw=2000.0)
    net.set("c", "b", 30.0, bw=100.0)
    net.set("a", "d", 10.0, bw=5000.0)
    net.set("d", "b", 200.0, bw=1000.0)
    settle(e, net)
    assert e.route(CONTROL, "b") == Route(("a", "c", "b"))
    assert e.route(BULK, "b") == Route(("a", "b"))  # 1000 Mbit/s, 100 ms beats d's 210 ms


def test_config_and_on_best() -> None:
    e, net = RouteElection("a", PEERS, RouteConfig(hysteresis=1)), full_mesh()
    e.elect(0.0, net.state, net.link, tick=True)
    assert all(e.on_best(k, d, net.state, net.link) for k in (CONTROL, BULK) for d in PEERS)


@given(st.lists(st.tuples(st.sampled_from(["b", "c", "d"]), st.sampled_from(["a", "b", "c", "d"]),
                          st.floats(1.0, 300.0), st.booleans(), st.sampled_from([0.0, 0.05, 0.3])),
                max_size=40),
       st.lists(st.tuples(st.sampled_from(PEERS), st.sampled_from(list(State))), max_size=5))
def test_every_elected_route_is_usable(changes: list, deaths: list) -> None:
    e, net = RouteElection("a", PEERS), full_mesh()
    for i, (x, y, rtt, down, loss) in enumerate(changes):
        if x != y:
            net.set(x, y, rtt, loss=loss, down=down)
        if i < len(deaths):
            net.states[deaths[i][0]] = deaths[i][1]
        e.elect(float(i), net.state, net.link, tick=bool(i % 2))
        for (_kind, dst), route in e.routes.items():
            if route is None:
                continue
            assert route.hops[0] == "a" and route.hops[-1] == dst and len(route.hops) <= 3
            assert net.state(dst) < State.DEAD
            if route.via is not None:
                assert net.state(route.via) == State.ALIVE
            for hop in zip(route.hops, route.hops[1:], strict=False):
                view = net.link(*hop)
                assert view is not None and not view.down and view.loss <= 0.1


PEERS5 = ["b", "c", "d", "e", "f"]


@given(st.lists(st.tuples(st.sampled_from(["a", *PEERS5]), st.sampled_from(["a", *PEERS5]),
                          st.floats(1.0, 300.0), st.booleans(), st.sampled_from([0.0, 0.05, 0.3]),
                          st.sampled_from([None, 50.0, 900.0])),
                min_size=1, max_size=60),
       st.lists(st.tuples(st.integers(0, 59), st.sampled_from(PEERS5),
                          st.sampled_from(list(State))), max_size=6),
       st.lists(st.booleans(), min_size=60, max_size=60))
def test_incremental_election_matches_full_recomputation(
        changes: list, states: list, ticks: list) -> None:
    """Told which links changed, the election reuses the other candidates: its routes
    and notifications are those of an election that recomputes everything each time."""
    net = Net()
    for x in ["a", *PEERS5]:
        for y in ["a", *PEERS5]:
            if x < y:
                net.set(x, y, 20.0 + 7 * (ord(x) + ord(y)) % 90, bw=100.0 * (ord(y) - ord(x)))
    full = RouteElection("a", PEERS5, RouteConfig(hysteresis=2))
    incr = RouteElection("a", PEERS5, RouteConfig(hysteresis=2))
    changed: set[tuple[str, str]] | None = None
    for i, (x, y, rtt, down, loss, bw) in enumerate(changes):
        if x != y:
            net.links[(x, y)] = LinkView(rtt, loss, down, 0.0, bw)  # one direction only
            if changed is not None:
                changed.add((x, y))
        for at, name, state in states:
            if at == i:
                net.states[name] = state
        a = full.elect(float(i), net.state, net.link, tick=ticks[i])
        b = incr.elect(float(i), net.state, net.link, tick=ticks[i], changed=changed)
        changed = set()
        assert a == b
        assert full.routes == incr.routes
