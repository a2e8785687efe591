"""The control plane over real runtimes on loopback (mesh.links.control_plane.attach): members see
each other alive, routes appear, a stopped DC is declared dead, all of it in the logs."""

from __future__ import annotations

import random
from pathlib import Path

import trio

from mesh.gossip.membership import State
from mesh.links.control_plane import MeshControl, attach
from mesh.links.routes import CONTROL
from tests.harness.runtime import Mesh
from tests.harness.waiting import wait_until


async def test_control_plane_runs_over_real_links(tmp_path: Path) -> None:
    mesh = Mesh(3, tmp_path)
    runtimes = {n: mesh.runtime(n, seed=i) for i, n in enumerate(mesh.names)}
    cores: dict[str, MeshControl] = {}
    for i, (n, rt) in enumerate(runtimes.items()):
        peers = [p for p in mesh.names if p != n]
        cores[n] = attach(rt, n, peers, random.Random(i), store=rt.store)
    async with trio.open_nursery() as nursery:
        for rt in runtimes.values():
            await nursery.start(rt.run)

        def routed() -> bool:
            return all(c.route(CONTROL, p) is not None for c in cores.values() for p in c.peers)

        # RTT samples after one ping period, routes after K = 3 elections of 1.5 s each.
        await wait_until(routed, "a control route between every pair", timeout=20.0)
        assert all(c.membership.state_of(p) == State.ALIVE
                   for c in cores.values() for p in c.peers)
        runtimes["dc3"].shutdown()
        await wait_until(lambda: all(cores[n].membership.state_of("dc3") >= State.DEAD
                                     for n in ("dc1", "dc2")), "dc3 dead at dc1 and dc2",
                         timeout=30.0)
        assert cores["dc1"].route(CONTROL, "dc3") is None
        for n in ("dc1", "dc2"):
            runtimes[n].shutdown()
    notes = [e for e in mesh.events("dc1") if e["event"] == "notify"]
    kinds = {e["kind"] for e in notes}
    assert {"member", "route", "link-mode"} <= kinds
    assert any(e["kind"] == "member" and e["detail"]["name"] == "dc3"
               and e["detail"]["state"] == "dead" for e in notes)

