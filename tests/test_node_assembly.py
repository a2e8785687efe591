"""The assembled node (federation.node.assembly) in-process: four DCs on loopback import a VM made
of real data, migrate it with its writer running, and recover everything after a restart."""

from __future__ import annotations

from pathlib import Path

import trio

from federation.demo.guest_writer import expected_pages, mismatches
from federation.vms.backend import VmState
from tests.harness.node import (
    image_hashes,
    import_with_writer,
    real_vm,
    running_nodes,
    wait_outcome,
    wait_vm,
    wait_writes,
)
from tests.harness.waiting import wait_until

NAMES = ("dc1", "dc2", "dc3", "dc4")


def _ledgers_agree(nodes: dict, vm: str, owner: str, epoch: int) -> None:
    digests = set()
    for name, node in nodes.items():
        ledger = node.need_core().replica.ledger
        assert ledger.owner(vm) == owner, f"{name} says {ledger.owner(vm)} owns {vm}"
        assert ledger.epoch(vm) == epoch, name
        digests.add(ledger.state_digest())
    assert len(digests) == 1, "the replicas' ledger states differ"


async def _settle(nodes: dict, height: int) -> None:
    await wait_until(lambda: all(n.need_core().replica.last_exec >= height
                                 for n in nodes.values()),
                     f"every replica executed up to {height}", 20)


def test_migrate_with_writer_then_restart_and_migrate_back(tmp_path: Path) -> None:
    from tests.harness.node import make_federation

    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")
    data = tmp_path / "data"

    async def first_run() -> tuple[str, int]:
        async with running_nodes(cfg, data, NAMES) as nodes:
            dc1, dc3 = nodes["dc1"], nodes["dc3"]
            info = await import_with_writer(dc1, "vm1", memory, [disk], rate=400, seed=7)
            assert info.state is VmState.RUNNING and info.epoch == 0
            await wait_writes(dc1, "vm1")  # dirty pages before the migration starts
            mid = await dc1.migrate("vm1", "dc3")
            assert await wait_outcome(dc1, mid) == "committed"
            assert await wait_outcome(dc3, mid) == "committed"
            await wait_vm(dc1, "vm1", "retired")
            await wait_vm(dc3, "vm1", "running")
            src = dc1.backend.info("vm1")
            dst = dc3.backend.info("vm1")
            assert (src.state, dst.state, dst.epoch) == (VmState.RETIRED, VmState.RUNNING, 1)
            # the target holds exactly the source's images as fenced ...
            assert image_hashes(dc3.backend.path("vm1")) == image_hashes(dc1.backend.path("vm1"))
            # ... and every page the writer wrote before the fence
            log = expected_pages(dc1.backend.path("vm1") / "writer.log")
            assert log, "the writer wrote nothing: the test would not exercise pre-copy"
            images = dc3.backend.open_images("vm1")
            try:
                assert mismatches(images, log) == []
            finally:
                for img in images.values():
                    img.close()
            outcome = dc1.need_core().outcomes[mid]
            assert outcome.bytes_sent >= sum(p.stat().st_size for p in (memory, disk))
            assert dc3.rounds.counters.received[mid] == outcome.bytes_sent
            height = max(n.need_core().replica.last_exec for n in nodes.values())
            await _settle(nodes, height)
            _ledgers_agree(nodes, "vm1", "dc3", 1)
            return mid, height

    mid, height = trio.run(first_run)

    async def second_run() -> None:
        async with running_nodes(cfg, data, NAMES) as nodes:
            for node in nodes.values():  # recovered from the durable log
                assert node.need_core().replica.last_exec >= height
            _ledgers_agree(nodes, "vm1", "dc3", 1)
            dc1, dc3 = nodes["dc1"], nodes["dc3"]
            assert dc1.need_core().sessions[mid].phase.value == "committed"
            assert dc3.backend.info("vm1").state is VmState.RUNNING
            back = await dc3.migrate("vm1", "dc1")
            assert await wait_outcome(dc3, back) == "committed"
            assert await wait_outcome(dc1, back) == "committed"
            await wait_vm(dc1, "vm1", "running")
            assert dc1.backend.info("vm1").epoch == 2
            await _settle(nodes, max(n.need_core().replica.last_exec for n in nodes.values()))
            _ledgers_agree(nodes, "vm1", "dc1", 2)

    trio.run(second_run)
