"""``dwcp demo-qemu`` (what ``make demo-qemu`` runs): a real guest live-migrated between
four ``dwcp node`` processes on loopback, there and back.

The self-checking guest (``make qemu-guest``, docs/qemu.md) is created at dc1 through the
node's API (``dwcp vm create --node``'s path: the spec and a disk under the node's import
directory, the kernel and initramfs under its ``[qemu] guest_files``) and boots under
TCG; once its checks pass it is live-migrated to dc3 while it runs (v3 rounds: HDE over
AMST), then back to dc1, which still holds its earlier copy as the diff's base. For each
leg the demo prints the bytes (logical and on the wire), the time from request to commit,
and the guest's downtime (the source's QMP ``stop`` to the target's ``cont``, measured
by the target), and checks on the guest's serial console that it kept counting without
a reboot and that its memory and disk checks still pass, and that exactly one QEMU runs
it. Exit status 0 only if every check held; every QEMU it started is powered off.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import trio

from consensus.ledger import SetPolicy
from federation.api.client import ClientError, import_vm
from federation.cli.main import CommandError
from federation.cli.ops import _human
from federation.demo.processes import START_BUDGET, DemoFailed, LocalFederation, run_scenario
from federation.demo.qemu_guest.build import GuestAssetsMissing, guest_cmdline, load_assets
from federation.demo.qemu_guest.console import Console, read_console
from federation.demo.scenario import Demo, ms
from federation.demo.stop_window import stop_timeline
from federation.node.node_config import render_node_config
from federation.vms.qemu_machine import pid_on

__all__ = ["register", "run_demo_qemu", "write_qemu_configs", "create_guest", "running_at",
           "power_off_guests", "leg_report", "GuestWatch"]

VM = "guest"
#: The guest's RAM and disk: the task's 64-128 MiB under TCG (tests.harness.qemu).
GUEST_MIB, DISK_MIB = 128, 16
#: Booting the cloud kernel under TCG took 8-25 s on the shared 2-core machine.
BOOT_BUDGET = 120.0
#: What the guest must show after each leg: heartbeats past the fence and a new check.
AFTER_HEARTBEATS = 20
#: A leg of pre-copy rounds of a TCG guest on a loaded 2-core machine: 45-60 s measured.
MIGRATE_BUDGET = 180.0
POLL = 0.2


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo-qemu", help="run 4 DC nodes locally and live-migrate a booted "
                                         "QEMU guest there and back")
    p.add_argument("--accel", choices=["tcg", "auto", "kvm"], default="tcg",
                   help="tcg (default: guests hang under KVM on these machines), auto "
                        "(probe by booting, 20 s), kvm")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.set_defaults(func=run_demo_qemu)


def run_demo_qemu(args: argparse.Namespace) -> int:
    try:
        assets = load_assets()
    except GuestAssetsMissing as exc:
        print(f"dwcp demo-qemu: {exc}", file=sys.stderr)
        return 2
    directory = Path(tempfile.mkdtemp(prefix="dwcp-demo-qemu-"))
    ram = Path(tempfile.mkdtemp(prefix="dwcp-demo-qemu-ram-", dir="/dev/shm"))
    try:
        trio.run(_demo, directory, ram, assets, args.accel)
    except DemoFailed as exc:
        print(f"\nFAILED: {exc}\n(data and node logs kept in {directory})", flush=True)
        return 1
    except Exception:  # a bug, or a node answering what the demo does not expect
        traceback.print_exc()
        print(f"\nFAILED: the demo itself failed (traceback above)\n(data and node logs "
              f"kept in {directory})", flush=True)
        return 1
    finally:
        power_off_guests(directory, ram)
        shutil.rmtree(ram, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(directory)
    else:
        print(f"(kept {directory})")
    return 0


def write_qemu_configs(fed: LocalFederation, directory: Path, images: Path, ram: Path,
                       assets: Any, accel: str) -> None:
    """Every DC's node config: imports from ``images``, a ``[qemu]`` table whose guest
    files are the self-checking guest's kernel and initramfs, guest RAM under ``ram/DC``."""
    guest_files = sorted({str(assets.kernel.parent), str(assets.initrd.parent)})
    files = ", ".join(f'"{d}"' for d in guest_files)
    for dc in fed.federation.names:
        (directory / "nodes" / f"{dc}.toml").write_text(
            render_node_config([str(images)])
            + f'\n[qemu]\nguest_files = [{files}]\naccel = "{accel}"\n'
              f'ram_dir = "{ram / dc}"\n')


async def create_guest(demo: Demo, dc: str, images: Path, assets: Any, mib: int,
                       cmdline: str, disk_mib: int = 0, vm: str = VM) -> dict[str, Any]:
    """Create and boot the self-checking guest ``vm`` at ``dc`` through its API (``dwcp
    vm create --node``'s path): a spec file and a zeroed disk of ``disk_mib`` (none: 0)
    under the node's import directory ``images``; the ledger's record of it."""
    spec = images / f"{vm}.toml"
    spec.write_text(f'kernel = "{assets.kernel}"\ninitrd = "{assets.initrd}"\n'
                    f'memory_mib = {mib}\nappend = "{cmdline}"\n')
    disks: tuple[str, ...] = ()
    if disk_mib:
        disk = images / f"{vm}-disk.img"
        with open(disk, "wb") as f:
            f.truncate(disk_mib << 20)
        disks = (str(disk),)
    try:
        doc: dict[str, Any] = await trio.to_thread.run_sync(import_vm, demo.apis[dc], vm,
                                                            str(spec), disks)
    except (ClientError, CommandError) as exc:
        raise DemoFailed(f"{dc}: creating {vm}: {exc}") from None
    return doc


def _qemu_root(directory: Path, dc: str) -> Path:
    return directory / "data" / dc / "qemu"


def running_at(directory: Path, ram: Path, dc: str, vm: str = VM) -> int | None:
    """The pid of the QEMU that runs ``vm`` at ``dc`` (in any run state), or None."""
    return pid_on(_qemu_root(directory, dc) / vm / "qemu.pid", ram / dc / vm / "memory.img")


def power_off_guests(directory: Path, ram: Path, vm: str = VM) -> None:
    """QEMU runs in its own session and outlives its node: kill every guest we started."""
    for dc in ("dc1", "dc2", "dc3", "dc4"):
        pid = running_at(directory, ram, dc, vm)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class GuestWatch:
    """The guest's serial console across the DCs it ran at, joined as one line."""

    def __init__(self, directory: Path, vm: str = VM) -> None:
        self.directory = directory
        self.vm = vm
        #: (dc, byte offsets its stay starts and ends at, None while there) in the order
        #: the guest ran there (a DC it comes back to appends to the same console)
        self.runs: list[tuple[str, int, int | None]] = []

    def log(self, dc: str) -> Path:
        return _qemu_root(self.directory, dc) / self.vm / "console.log"

    def size(self, dc: str) -> int:
        path = self.log(dc)
        return path.stat().st_size if path.exists() else 0

    def arrive(self, dc: str, offset: int) -> None:
        """The guest runs at ``dc`` now, its lines there from byte ``offset`` (the size of
        that console before the migration began: the target's QEMU writes from ``cont``);
        the stay before ends where its console is now (its QEMU is retired)."""
        if self.runs:
            was, start, _ = self.runs[-1]
            self.runs[-1] = (was, start, self.size(was))
        self.runs.append((dc, offset, None))

    def read(self) -> Console:
        return read_console([self.log(dc) for dc, _, _ in self.runs],
                            [o for _, o, _ in self.runs], [e for _, _, e in self.runs])

    async def wait(self, what: str, holds: Any, budget: float) -> Console:
        deadline = trio.current_time() + budget
        while True:
            con = await trio.to_thread.run_sync(self.read)
            if con.errors:
                raise DemoFailed(f"the guest reported {con.errors[0]!r}")
            if holds(con):
                return con
            if trio.current_time() > deadline:
                tail = con.text[-400:].replace("\n", " | ")
                raise DemoFailed(f"the guest did not show {what} in {budget:.0f} s: ...{tail}")
            await trio.sleep(POLL)


async def _demo(directory: Path, ram: Path, assets: Any, accel: str) -> None:
    began = trio.current_time()
    fed = LocalFederation(directory, 4)
    print("DWCP demo-qemu: a booted QEMU guest live-migrated across a 4-DC federation",
          flush=True)
    images = directory / "images"
    images.mkdir(exist_ok=True)
    write_qemu_configs(fed, directory, images, ram, assets, accel)
    await run_scenario(fed, began, partial(_scenario, fed, directory, ram, images, assets))


async def _scenario(fed: LocalFederation, directory: Path, ram: Path, images: Path,
                    assets: Any, nursery: trio.Nursery) -> None:
    demo = Demo(fed, directory, DemoFailed)
    names = list(fed.nodes)
    home, away = names[0], names[2]
    print(f"\n1. starting {len(names)} `dwcp node` processes (qemu backend, TCG) ...",
          flush=True)
    t0 = trio.current_time()
    await fed.start_all(nursery)
    await fed.wait_full_mesh(t0 + START_BUDGET)
    await demo.wait_ready(t0 + START_BUDGET)
    print(f"   full mesh and PBFT quorum ready {ms(trio.current_time() - t0)} after start")
    await demo.post(home, "/api/policy", SetPolicy(100, (), (), False))
    print("   rollout policy: v3 (HDE over AMST) for every VM")

    print(f"\n2. creating the self-checking guest at {home} through its API ...", flush=True)
    doc = await create_guest(demo, home, images, assets, GUEST_MIB, guest_cmdline(0, True),
                             DISK_MIB)
    print(f"   {VM}: {GUEST_MIB} MiB RAM, {DISK_MIB} MiB disk, ledger epoch {doc['epoch']}, "
          f"{doc['state']}")
    watch = GuestWatch(directory)
    watch.arrive(home, 0)
    t_boot = trio.current_time()
    con = await watch.wait("two verified rounds after boot", lambda c: len(c.checks) >= 2,
                           BOOT_BUDGET)
    print(f"   booted; heartbeat {con.last_heartbeat}, {len(con.checks)} memory+disk checks "
          f"passed ({ms(trio.current_time() - t_boot)})")

    legs = []
    for n, (src, dst) in enumerate(((home, away), (away, home)), start=3):
        what = "there" if dst == away else "back (the target holds its earlier copy)"
        print(f"\n{n}. live-migrating {VM} {src} -> {dst} while its checks run, {what} ...",
              flush=True)
        before = watch.read()
        offset = watch.size(dst)
        doc = await demo.migrate(VM, src, dst, MIGRATE_BUDGET)
        watch.arrive(dst, offset)
        leg = await leg_report(demo, doc, src, dst)
        con = await watch.wait(
            f"{AFTER_HEARTBEATS} heartbeats and a new check at {dst}",
            lambda c, b=before: c.last_heartbeat >= b.last_heartbeat + AFTER_HEARTBEATS
            and len(c.checks) > len(b.checks), BOOT_BUDGET)
        if con.boots != 1 or con.counter_gaps():
            raise DemoFailed(f"the guest rebooted or lost count: {con.boots} boots, gaps "
                             f"{con.counter_gaps()[:3]}")
        copies = [dc for dc in names if running_at(directory, ram, dc)]
        if copies != [dst]:
            raise DemoFailed(f"the guest runs at {copies}, not only at {dst}")
        print(f"   guest: counter continued without a gap (now {con.last_heartbeat}), "
              f"{len(con.checks)} checks passed, no reboot; one QEMU runs it, at {dst}")
        legs.append(leg)

    print("\n   side by side")
    print(f"   {'leg':<12}{'logical':>12}{'on the wire':>14}{'time':>10}{'downtime':>11}")
    for leg in legs:
        print(f"   {leg['leg']:<12}{_human(leg['bytes']):>12}{_human(leg['wire']):>14}"
              f"{ms(leg['time']):>10}{leg['downtime_ms']:>8.0f} ms")

    print("\n5. SIGTERM to the nodes; the guests are powered off ...", flush=True)
    for node in fed.nodes.values():
        node.terminate()
    for dc, node in fed.nodes.items():
        await node.wait_for("exit after SIGTERM", node.exited, trio.current_time() + 15.0)
        if node.returncode != 0:
            raise DemoFailed(f"{dc} exited with status {node.returncode} after SIGTERM")


async def leg_report(demo: Demo, doc: dict[str, Any], src: str, dst: str,
                     show: bool = True) -> dict[str, Any]:
    """A committed leg's figures: logical and wire bytes (the source's count), request to
    commit, and the downtime the target measured (its QMP ``cont`` minus the source's
    ``stop``), read from the target's API once it has it."""
    mid, out = doc["id"], doc["outcome"]
    path = f"/api/migrations/{mid}"
    deadline = trio.current_time() + 30.0
    while True:
        there = await demo.get(dst, path)
        # the phases come a moment after the downtime (a second write of the arrival)
        if there.get("downtime_ms") is not None and (
                there.get("stop_window_ms") is not None or trio.current_time() > deadline):
            break
        if trio.current_time() > deadline:
            raise DemoFailed(f"{dst} reported no downtime for {mid}")
        await trio.sleep(POLL)
    leg = {"leg": f"{src}->{dst}", "bytes": out["bytes_sent"], "wire": out["wire_bytes"],
           "time": doc["elapsed"], "downtime_ms": there["downtime_ms"]}
    leg["rounds"] = out["rounds"]
    # the stop window: the target's phases, and both nodes' log marks in it (their log
    # lines arrive after the API has the downtime: wait for the target's start line)
    leg["stop_window_ms"] = there.get("stop_window_ms")
    leg["start_split_ms"] = there.get("start_split_ms")
    node = demo.fed.nodes[dst]

    def started() -> bool:
        return any(e["event"] == "vm_action" and e.get("action") == "StartAtTarget"
                   and e.get("migration_id") == mid for e in node.events)

    with contextlib.suppress(DemoFailed):  # the marks it has are reported all the same
        await node.wait_for(f"{dst}'s start of {mid} in its log", started,
                            trio.current_time() + 10.0)
    leg["stop_timeline"] = stop_timeline(demo.fed.nodes[src].events, node.events, mid,
                                         float(there.get("stopped_at") or 0.0))
    if not show:
        return leg
    print(f"   committed in {out['rounds']} rounds: {_human(leg['bytes'])} logical, "
          f"{_human(leg['wire'])} on the wire, {ms(leg['time'])} request to commit, "
          f"downtime {leg['downtime_ms']:.0f} ms (stop at {src} to cont at {dst})")
    marks = ", ".join(f"{m['mark']} {m['ms']:.0f}" for m in leg["stop_timeline"])
    print(f"   stop window (ms after the stop): {marks}")
    return leg
