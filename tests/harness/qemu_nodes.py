"""Real ``dwcp node`` processes that run the self-checking guest in their qemu backend
(docs/qemu.md, "The node"): the federation of :func:`tests.harness.processes.node_processes`
with a ``[qemu]`` table in every node config, the guest created at a node through its API
(``dwcp vm create --node``'s path), and the QEMUs found and powered off at the end (they
run in their own sessions and outlive a killed node)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.netns import FarLink
from federation.api.client import import_vm
from federation.demo.qemu_guest.build import guest_cmdline, load_assets
from federation.demo.qemu_guest.console import Console, read_console
from federation.vms.qemu_machine import pid_on
from tests.harness.processes import NAMES, NodeProcesses, node_processes

__all__ = ["qemu_nodes", "create_guest", "console_logs", "guest_console", "running_copies",
           "qemu_processes", "qemu_process_list", "GUEST_MIB"]

#: As tests.harness.qemu: the task's 64-128 MiB guest under TCG, a 16 MiB disk.
GUEST_MIB = 128
DISK_MIB = 16


def _ram_dir(tmp_path: Path, dc: str) -> Path:
    """Guest RAM of ``dc`` on tmpfs, in a directory of this test run only: a test's
    ``tmp_path.name`` is the same in every run of it (other worktrees' runs at the same
    time included), so the full path's digest names it; the run's teardown removes it."""
    run = hashlib.sha256(str(tmp_path.resolve()).encode()).hexdigest()[:12]
    return Path("/dev/shm") / f"dwcp-test-{os.getuid()}-{tmp_path.name[:40]}-{run}" / dc


@contextlib.contextmanager
def qemu_nodes(tmp_path: Path, far: FarLink | None = None,
               far_dc: str = "dc3", **placed: Any) -> Iterator[NodeProcesses]:
    """Four node processes with the qemu backend (TCG), guest RAM on /dev/shm; every QEMU
    they started is killed and every RAM file removed at the end. With ``far`` (an open
    :class:`bench.netns.FarLink`), ``far_dc``'s node runs in its far namespace and the
    others listen on its near address: every byte to or from ``far_dc`` crosses the link
    (tbf-shaped or not), the others talk over this host's own stack. ``placed``: passed to
    :func:`tests.harness.processes.node_processes` as is (``host``, ``hosts``,
    ``prefixes``, ``before_start``: ``make netns-chaos`` puts every DC in a namespace)."""
    assets = load_assets()
    guest_files = sorted({str(assets.kernel.parent), str(assets.initrd.parent)})

    def extra(dc: str) -> str:
        files = ", ".join(f'"{d}"' for d in guest_files)
        return (f'\n[qemu]\nguest_files = [{files}]\naccel = "tcg"\n'
                f'ram_dir = "{_ram_dir(tmp_path, dc)}"\n')

    nodes: NodeProcesses | None = None
    try:
        if far is not None:
            placed = {**placed, "host": far.near, "hosts": {far_dc: far.far},
                      "prefixes": {far_dc: far.far_prefix()}}
        with node_processes(tmp_path, node_config=extra, **placed) as nodes:
            yield nodes
    finally:
        if nodes is not None:
            nodes.kill_all()
            for dc in NAMES:
                kill_guests(nodes, dc)
        shutil.rmtree(_ram_dir(tmp_path, "x").parent, ignore_errors=True)


def qemu_dir(nodes: NodeProcesses, dc: str) -> Path:
    return nodes.cfg.parent / "data" / dc / "qemu"


def running_copies(nodes: NodeProcesses, vm: str) -> list[str]:
    """The DCs where a QEMU of ``vm`` runs (in any run state)."""
    out = []
    for dc in NAMES:
        d = qemu_dir(nodes, dc) / vm
        ram = _ram_dir(nodes.cfg.parent.parent, dc) / vm / "memory.img"
        if pid_on(d / "qemu.pid", ram) is not None:
            out.append(dc)
    return out


def qemu_processes(nodes: NodeProcesses, vm: str) -> list[str]:
    """The DC of every ``qemu-system`` process on this host that runs ``vm`` for these
    nodes (its command line names the VM's RAM file under the test's RAM directory), pid
    files or not: a QEMU a node lost track of counts too."""
    return sorted(dc for dc, _ in qemu_process_list(nodes, vm))


def qemu_process_list(nodes: NodeProcesses, vm: str) -> list[tuple[str, str]]:
    """(DC, a line on the process: pid, parent, state, and its pid file's pid) of every
    ``qemu-system`` process that runs ``vm`` for these nodes: what a failed check shows."""
    ram = _ram_dir(nodes.cfg.parent.parent, "x").parent
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if not argv or b"qemu-system" not in argv[0]:
            continue
        for dc in NAMES:
            if any(f"{ram / dc / vm / 'memory.img'}".encode() in a for a in argv):
                pidfile = qemu_dir(nodes, dc) / vm / "qemu.pid"
                try:
                    recorded = pidfile.read_text().strip()
                except OSError:
                    recorded = "none"
                incoming = "incoming" if b"-incoming" in argv else "booted"
                out.append((dc, f"{dc}: pid {proc.name} ppid {stat[1]} state {stat[0]} "
                                f"{incoming}, pid file {recorded}"))
    return sorted(out)


def kill_guests(nodes: NodeProcesses, dc: str) -> None:
    root = qemu_dir(nodes, dc)
    if not root.is_dir():
        return
    for d in root.iterdir():
        pid = pid_on(d / "qemu.pid", _ram_dir(nodes.cfg.parent.parent, dc) / d.name
                     / "memory.img")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def create_guest(nodes: NodeProcesses, dc: str, vm: str, tmp_path: Path,
                 fill_percent: int = 0) -> None:
    """Create and boot the self-checking guest ``vm`` at ``dc`` through its API: a spec
    file and a zeroed disk under the node's import directory, staged, then registered."""
    assets = load_assets()
    spec = tmp_path / f"{vm}.toml"
    spec.write_text(f'kernel = "{assets.kernel}"\ninitrd = "{assets.initrd}"\n'
                    f'memory_mib = {GUEST_MIB}\n'
                    f'append = "{guest_cmdline(fill_percent, True)}"\n')
    disk = tmp_path / f"{vm}-disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    import_vm(nodes.api(dc), vm, str(spec), (str(disk),))


def console_logs(nodes: NodeProcesses, vm: str, order: list[str]) -> list[Path]:
    return [qemu_dir(nodes, dc) / vm / "console.log" for dc in order]


def guest_console(nodes: NodeProcesses, vm: str, order: list[str],
                  offsets: list[int] | None = None,
                  ends: list[int | None] | None = None) -> Console:
    """The guest's console as one serial line: the DCs' logs in the order it ran there,
    each stay from its offset to its end (a DC it came back to holds both stays)."""
    return read_console(console_logs(nodes, vm, order), offsets or [], ends or [])
