"""Four in-process nodes with images sealed at rest (issue 15 item 6, issue 16 item 7): a
VM migrates there and back over sealed images, what each DC keeps is sealed, retained
copies are counted in /metrics and purged on an operator's signed request."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from consensus.ledger import ImportVm
from federation.node.errors import NodeError
from federation.node.status import migration_status
from federation.vms.actions import images_root
from federation.vms.image_backend import ImageBackend
from federation.vms.retention import PurgeVm
from federation.vms.sealed_image import is_sealed
from tests.harness.api import call
from tests.harness.node import (
    add_operator,
    import_vm,
    make_federation,
    migrate,
    real_vm,
    running_nodes,
    set_policy,
    signed,
    wait_outcome,
    wait_vm,
)

pytestmark = pytest.mark.trio


def root_of(backend: ImageBackend, vm: str) -> bytes:
    images = backend.open_images(vm)
    try:
        return images_root(images)
    finally:
        for img in images.values():
            img.close()


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        got_name, _, rest = head.partition("{")
        got = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if got_name == name and got == labels:
            return float(value)
    raise AssertionError(f"no {name} {labels} in /metrics")


async def test_sealed_migration_there_and_back_then_purge(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    add_operator(cfg, "val", "viewer")
    add_operator(cfg, "otto", "operator")
    memory, disk = real_vm(tmp_path / "vm")
    async with running_nodes(cfg, tmp_path / "data", at_rest=True) as nodes:
        dc1, dc2 = nodes["dc1"], nodes["dc2"]
        b1, b2 = dc1.backend, dc2.backend
        assert isinstance(b1, ImageBackend) and b1.seal_key is not None
        await import_vm(dc1, "web", memory, [disk])
        plain = memory.read_bytes()
        stored = dc1.data_dir / "vms" / "web"
        assert all(is_sealed(p) for p in stored.glob("*.img"))
        assert plain[:4096] not in (stored / "memory.img").read_bytes()
        root = await trio.to_thread.run_sync(root_of, b1, "web")

        await set_policy(dc1, 0)  # there over v1 (the rounds core writes the chunks)
        mid = await migrate(dc1, "web", "dc2")
        assert await wait_outcome(dc1, mid) == "committed"
        assert set(migration_status(dc1, mid)["data_plane"]) == {"v1"}
        await wait_vm(dc2, "web", "running")
        await wait_vm(dc1, "web", "retired")
        assert await trio.to_thread.run_sync(root_of, b2, "web") == root
        assert all(is_sealed(p) for p in (dc2.data_dir / "vms" / "web").glob("*.img"))
        # dc1 keeps a retained copy, sealed, counted in its metrics
        assert all(is_sealed(p) for p in stored.glob("*.img"))
        code, text = await call(dc1, "GET", "/metrics")
        assert code == 200
        assert metric(text, "dwcp_retained_copies") == 1
        assert metric(text, "dwcp_retained_bytes") >= len(plain)
        assert metric(text, "dwcp_vm_disk_bytes", vm="web", state="retired") >= len(plain)
        assert metric(text, "dwcp_at_rest_sealed") == 1

        # back to dc1 over v3, its retained copy the base of the HDE diff
        await set_policy(dc1, 100)
        back = await migrate(dc2, "web", "dc1")
        assert await wait_outcome(dc2, back) == "committed"
        status = migration_status(dc2, back)
        assert set(status["data_plane"]) == {"v3"}
        # nothing changed since dc1 retired its copy: HDE found every page in it
        assert status["wire_bytes"] < len(plain) // 20, status
        await wait_vm(dc1, "web", "running")
        await wait_vm(dc2, "web", "retired")
        assert await trio.to_thread.run_sync(root_of, b1, "web") == root

        # purge dc2's retained copy: a viewer may not, the path and the intent must agree,
        # a running VM is no retained copy, an operator may
        path = "/api/vms/web/purge"
        code, doc = await call(dc2, "POST", path, PurgeVm("web"), operator="val")
        assert code == 403 and "this needs operator" in doc["error"]
        code, doc = await call(dc2, "POST", path, PurgeVm("other"), operator="otto")
        assert code == 400 and "signed the purge of 'other'" in doc["error"]
        code, doc = await call(dc1, "POST", path, PurgeVm("web"), operator="otto")
        assert code == 409 and "belongs to this DC in the ledger" in doc["error"]
        code, doc = await call(dc2, "POST", path, PurgeVm("web"), operator="otto")
        assert code == 200 and doc["freed_bytes"] >= len(plain), doc
        assert not (dc2.data_dir / "vms" / "web").exists()
        code, text = await call(dc2, "GET", "/metrics")
        assert metric(text, "dwcp_retained_copies") == 0
        assert metric(text, "dwcp_retained_removed_total", reason="purge") == 1
        code, doc = await call(dc2, "POST", path, PurgeVm("web"), operator="otto")
        assert code == 409 and "no VM 'web'" in doc["error"]


async def test_an_import_the_ledger_refuses_leaves_nothing_behind(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    add_operator(cfg, "val", "viewer")
    memory, disk = real_vm(tmp_path / "vm")
    async with running_nodes(cfg, tmp_path / "data", at_rest=True) as nodes:
        dc1 = nodes["dc1"]
        intent = ImportVm("web", "dc1", str(memory), (str(disk),))
        staged, fds = dc1.imports.begin("web", intent.memory, intent.disks)
        await dc1.imports.copy(staged, fds)
        assert staged.state == "staged"
        # a viewer's register reaches the ledger (this bypasses the API's door) and
        # every replica refuses it: the staged copy goes with the refusal
        with pytest.raises(NodeError, match="refused to register"):
            await dc1.import_vm("web", signed(dc1, "POST", "/api/vms", intent, "val"))
        assert [v.name for v in dc1.backend.list_vms()] == []
        assert list((dc1.data_dir / "vms").iterdir()) == []
        assert dc1.imports.status("web") is None
