"""A whole-federation restart keeps everything (issue 16 item 2): every DC stopped (SIGTERM,
and separately kill -9) and started again in another order comes back with its ledger at
the height it had and every VM's owner, before any new request reaches the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from consensus.ledger import SetPolicy
from federation.api.client import import_vm
from tests.harness.node import ext4_image, memory_image
from tests.harness.processes import NAMES, NodeProcesses, node_processes


def _ledgers(nodes: NodeProcesses) -> dict[str, tuple[int, dict[str, Any]]]:
    """Per DC: (ledger height, {vm: (owner, epoch)})."""
    out = {}
    for name in NAMES:
        doc = nodes.status(name)
        out[name] = (doc["ledger"]["height"],
                     {v["name"]: (v["owner"], v["epoch"]) for v in doc["vms"]})
    return out


@pytest.mark.processes
@pytest.mark.parametrize("stop", ["sigterm", "kill-9"])
def test_every_dc_stopped_and_started_in_another_order_keeps_its_ledger(
        tmp_path: Path, stop: str) -> None:
    memory = memory_image(tmp_path / "memory.img", 1 << 20)
    disk = ext4_image(tmp_path / "disk.img")
    with node_processes(tmp_path) as nodes:
        dc1, dc2 = nodes.api("dc1"), nodes.api("dc2")
        import_vm(dc1, "vm1", str(memory), (str(disk),))
        import_vm(dc2, "vm2", str(memory), (str(disk),))
        dc1.ok("POST", "/api/policy", SetPolicy(40, ("dc3",), (), False))
        before = nodes.wait("every ledger at one height with both VMs", lambda: (
            (got := _ledgers(nodes)) and len({repr(v) for v in got.values()}) == 1
            and len(got["dc1"][1]) == 2 and got))
        height, owners = before["dc1"]
        assert owners == {"vm1": ("dc1", 0), "vm2": ("dc2", 0)}
        assert height > 0

        if stop == "sigterm":
            assert nodes.stop_all() == {n: 0 for n in NAMES}
        else:
            nodes.kill_all()
        for name in ("dc4", "dc2", "dc3", "dc1"):  # another order than the first start
            nodes.start(name)
        nodes.wait("every DC ready again", lambda: all(nodes.ready(n) for n in NAMES))
        after = nodes.wait("every ledger back at its height with every owner", lambda: (
            (got := _ledgers(nodes)) and all(v == (height, owners) for v in got.values())
            and got), timeout=30)
        assert after == before
        for name in NAMES:  # the policy is ledger state too
            assert nodes.api(name).ok("GET", "/api/policy")["v3_percent"] == 40
        nodes.wait("vm1 and vm2 run again at their owners", lambda: (
            nodes.vm_here("dc1", "vm1") == "running" and nodes.vm_here("dc2", "vm2") == "running"))
        # no request was made since the restart: the heights did not move to get here
        assert {n: nodes.status(n)["ledger"]["height"] for n in NAMES} == \
            {n: height for n in NAMES}
