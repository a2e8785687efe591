"""Shared by the node tests: a federation on loopback, real VM data, in-process nodes.

VM data is real, never random: the disk is an ext4 filesystem built by ``mke2fs -d``
from a directory of the Python standard library, the memory is this process's own
readable memory pages (``/proc/self/mem``).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from consensus.authz import Authorization
from consensus.ledger import ImportVm, MigrateVm, SetPolicy
from federation import config
from federation.api.auth import load_operator_key, sign_request, write_operator_key
from federation.api.client import CONFIG_ENV, KEY_ENV
from federation.api.http import serve_node
from federation.cli.keys import INIT_OPERATOR, init_federation
from federation.demo.guest_backend import WritingBackend
from federation.demo.processes import free_base_port
from federation.demo.real_data import write_process_memory
from federation.node.assembly import Node
from federation.vms.at_rest_key import key_if_any, load_or_create
from federation.vms.backend import VmInfo
from federation.vms.sealed_image import content_sha256
from federation.vms.sealing import SealKey
from mesh import identity, wire
from mesh.runtime.log import JsonLog
from tests.harness.waiting import wait_until

PAGE = 4096
#: A small stdlib package: a few hundred KiB of real files for the ext4 image.
DISK_SOURCE = "/usr/lib/python3.11/json"


def make_federation(directory: Path, count: int = 4, host: str = "127.0.0.1",
                    hosts: dict[str, str] | None = None) -> Path:
    """A federation of ``count`` DCs on free ports of ``host`` (loopback; a DC named in
    ``hosts`` on the address given there); the ``dwcp`` processes the test runs sign as its
    admin (``$DWCP_CONFIG``, ``$DWCP_OPERATOR_KEY``, reset after each test by
    tests/conftest.py)."""
    cfg = init_federation(directory, count, base_port=free_base_port(count, host), host=host,
                          hosts=hosts)
    os.environ[CONFIG_ENV] = str(cfg)
    os.environ[KEY_ENV] = str(directory / "keys" / f"{INIT_OPERATOR}.key")
    return cfg


def ext4_image(path: Path, mib: int = 4) -> Path:
    mke2fs = shutil.which("mke2fs") or shutil.which("/usr/sbin/mke2fs")
    if mke2fs is None or not Path(DISK_SOURCE).is_dir():
        pytest.skip("needs mke2fs and a Python stdlib directory to build a real disk image")
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", DISK_SOURCE, str(path), f"{mib}M"],
                   check=True, capture_output=True)
    return path


def memory_image(path: Path, limit: int = 6 << 20) -> Path:
    """This process's readable memory, page-aligned, up to ``limit`` bytes."""
    return write_process_memory(path, limit)


def real_vm(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return memory_image(directory / "memory.img"), ext4_image(directory / "disk.img")


def image_hashes(vm_dir: Path, key: SealKey | None = None) -> dict[str, str]:
    """SHA-256 of each image's pages; a sealed image is read with ``key``, by default the
    key ``dwcp node`` made for the DC the directory belongs to (tests/harness/processes
    layout: <federation dir>/data/<DC>/vms/<VM>, keys in <federation dir>/keys)."""
    if key is None and len(vm_dir.parents) > 3:
        key = key_if_any(vm_dir.parents[3] / "keys" / f"{vm_dir.parents[1].name}.at-rest")
    return {p.name: content_sha256(p, key) for p in sorted(vm_dir.glob("*.img"))}


def build_node(cfg: Path, name: str, data_root: Path,
               transfer_versions: tuple[int, ...] = (1, 3), *,
               at_rest: bool = False, retained_max: int | None = None) -> Node:
    """A node over the image backend with the demo's page writer available
    (:func:`import_with_writer`); it imports VM images from anywhere under the test's
    directory (the federation file's parent's parent: pytest's ``tmp_path``). With
    ``at_rest`` it runs the production image backend instead, its images sealed with an
    at-rest key of its own (keys/<DC>.at-rest, made at the first build)."""
    fed = config.load(cfg)
    ident = identity.load_key_file(cfg.parent / "keys" / f"{name}.key")
    log = JsonLog(name, io.StringIO())
    if at_rest:
        key, _ = load_or_create(cfg.parent / "keys" / f"{name}.at-rest", False)
        return Node(fed, name, ident, data_root / name, log=log, at_rest_key=key,
                    retained_max=retained_max, transfer_versions=transfer_versions,
                    import_dirs=(cfg.parent.parent,))
    return Node(fed, name, ident, data_root / name, log=log,
                backend=WritingBackend(data_root / name / "vms"),
                transfer_versions=transfer_versions, import_dirs=(cfg.parent.parent,))


def add_operator(cfg: Path, name: str, role: str) -> Path:
    """Add operator ``name`` of ``role`` to the federation file ``cfg``; its key goes to
    keys/<name>.key beside it (returned)."""
    ident = identity.generate()
    key = cfg.parent / "keys" / f"{name}.key"
    write_operator_key(key, ident)
    with cfg.open("a") as f:
        f.write(f'\n[[operators]]\nname = "{name}"\npublic_key = "{ident.public}"\n'
                f'role = "{role}"\n')
    config.load(cfg)
    return key


def signed(node: Node, method: str, target: str, intent: object,
           operator: str = INIT_OPERATOR) -> Authorization:
    """``intent`` signed now by ``operator`` (its key next to ``node``'s federation file),
    as the API's door hands it to the node."""
    keys = Path(node.fed.source).parent / "keys"
    key = load_operator_key(keys / f"{operator}.key", node.fed)
    body = wire.encode(intent)
    return Authorization(sign_request(key, node.fed, method, target, body, time.time()), body)


async def import_vm(node: Node, vm: str, memory: Path, disks: list[Path]) -> VmInfo:
    """Import ``vm`` at ``node`` as ``dwcp vm import`` does: stage the copy, then register
    it on a request signed after the copy."""
    intent = ImportVm(vm, node.name, str(memory), tuple(str(d) for d in disks))
    staged, fds = node.imports.begin(vm, intent.memory, intent.disks)
    await node.imports.copy(staged, fds)
    assert staged.state == "staged", staged.error
    return await node.import_vm(vm, signed(node, "POST", "/api/vms", intent))


async def migrate(node: Node, vm: str, target: str) -> str:
    """Migrate ``vm`` from ``node`` (its owner) to ``target`` on the admin's request."""
    epoch = node.need_core().ledger.epoch(vm)
    intent = MigrateVm(vm, target, node.name, 0 if epoch is None else epoch)
    return await node.migrate(vm, target, signed(node, "POST", "/api/migrations", intent))


async def set_policy(node: Node, v3_percent: int, *, kill_switch: bool = False,
                     target_dcs: tuple[str, ...] = (), target_vms: tuple[str, ...] = ()
                     ) -> SetPolicy:
    policy = SetPolicy(v3_percent, target_dcs, target_vms, kill_switch)
    return await node.set_policy(policy,
                                 authorization=signed(node, "POST", "/api/policy", policy))


async def import_with_writer(node: Node, vm: str, memory: Path, disks: list[Path], *,
                             rate: float, seed: int) -> VmInfo:
    """Import ``vm`` at ``node`` as an operator does, then run the demo's page writer on it
    (the writer is a test tool, not part of the node's API)."""
    info = await import_vm(node, vm, memory, disks)
    backend = node.backend
    assert isinstance(backend, WritingBackend), "build_node gives nodes a WritingBackend"
    await trio.to_thread.run_sync(backend.attach_writer, vm, seed, rate)
    return info


@asynccontextmanager
async def running_nodes(cfg: Path, data_root: Path,
                        names: tuple[str, ...] = ("dc1", "dc2", "dc3", "dc4"),
                        versions: dict[str, tuple[int, ...]] | None = None,
                        views: dict[str, Path] | None = None,
                        at_rest: bool = False,
                        ) -> AsyncIterator[dict[str, Node]]:
    """Nodes in this process (``versions[name]`` limits what a node offers; node ``n``
    reads the federation file ``views[n]`` if given, e.g. one that sends its data to a
    relay); yields once every link is up; shuts down cleanly. ``at_rest``: see
    :func:`build_node`."""
    offered, seen = versions or {}, views or {}
    nodes = {n: build_node(seen.get(n, cfg), n, data_root, offered.get(n, (1, 3)),
                           at_rest=at_rest)
             for n in names}
    try:
        async with trio.open_nursery() as nursery:
            for node in nodes.values():
                await nursery.start(serve_node, node)
            await wait_until(lambda: all(len(n.runtime.links) == len(names) - 1
                                         for n in nodes.values()), "every link up", 20)
            yield nodes
            for node in nodes.values():
                node.shutdown()
    finally:
        for node in nodes.values():
            node.close()


async def wait_outcome(node: Node, mid: str, timeout: float = 60) -> str:
    """``committed``, or ``aborted: <reason>``, once ``node`` knows how ``mid`` ended."""
    core = node.need_core()
    o = await wait_until(lambda: core.outcomes.get(mid), f"the outcome of {mid} at {node.name}",
                         timeout)
    return o.outcome if o.outcome == "committed" else f"{o.outcome}: {o.reason}"


async def wait_vm(node: Node, vm: str, state: str, timeout: float = 30) -> None:
    """The ledger's word is carried out by the VM worker after the outcome: wait for it."""
    await wait_until(lambda: any(i.name == vm and i.state.value == state
                                 for i in node.backend.list_vms()),
                     f"{vm} {state} at {node.name}", timeout)


async def wait_writes(node: Node, vm: str, writes: int = 100, timeout: float = 30) -> None:
    """Until the page writer of running ``vm`` has made ``writes`` writes: a migration
    started then has dirty pages to chase in its pre-copy rounds."""

    def written() -> bool:
        thread = node.backend.writer(vm)
        return thread is not None and thread.writer.seq >= writes

    await wait_until(written, f"{writes} writes by the page writer of {vm} at {node.name}",
                     timeout)


async def migrate_checked(src: Node, dst: Node, vm: str) -> str:
    """Migrate ``vm`` from ``src`` to ``dst``; it commits, runs at ``dst`` with the images
    ``src`` held at the fence, and is retired at ``src``. Returns the migration id."""
    mid = await migrate(src, vm, dst.name)
    assert await wait_outcome(src, mid) == "committed"
    await wait_vm(dst, vm, "running")
    await wait_vm(src, vm, "retired")
    assert image_hashes(dst.backend.path(vm)) == image_hashes(src.backend.path(vm))
    return mid


def redirect(cfg: Path, name: str, data_ports: dict[str, int]) -> Path:
    """A copy of the federation file as ``name`` sees it: the data endpoints of the DCs in
    ``data_ports`` are at those loopback ports (the keys stay next to it)."""
    text = cfg.read_text()
    for dc, port in data_ports.items():
        block = re.compile(rf'(name = "{dc}"\n(?:.*\n)*?data = "127\.0\.0\.1:)(\d+)(")')
        text, n = block.subn(rf"\g<1>{port}\g<3>", text, count=1)
        assert n == 1, f"no data endpoint for {dc} in {cfg}"
    out = cfg.with_name(f"federation-{name}.toml")
    out.write_text(text)
    return out


def data_port(cfg: Path, dc: str) -> int:
    """The loopback port of ``dc``'s data endpoint in the federation file ``cfg``."""
    m = re.search(rf'name = "{dc}"\n(?:.*\n)*?data = "127\.0\.0\.1:(\d+)"', cfg.read_text())
    assert m is not None
    return int(m.group(1))
