"""Booted self-checking guests for the qemu backend's tests (docs/qemu.md).

:func:`qemu_missing` says which machine capability a test lacks (the QEMU binary, the
guest built by ``make qemu-guest``, a tmpfs for guest RAM); :class:`QemuLab` holds
backends whose guests it powers off at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from federation.demo.qemu_guest.build import GuestAssetsMissing, guest_cmdline, load_assets
from federation.demo.qemu_guest.console import Console, read_console, wait_console
from federation.vms.qemu_backend import QemuBackend, VmSpec
from federation.vms.qemu_spec import QEMU

__all__ = ["qemu_missing", "QemuLab", "qemu_lab", "BOOT_TIMEOUT"]

#: Booting the cloud kernel under TCG took 8-25 s on the 2-core machine while other jobs
#: ran (bench.corpus.guest); 180 s covers a heavily shared host.
BOOT_TIMEOUT = 180.0
#: The test guest: 128 MiB of RAM (the task's 64-128 MiB under TCG) and a 16 MiB disk
#: (the workload checks 8 slots of 1 MiB on it).
GUEST_MIB = 128
DISK_MIB = 16


def qemu_missing() -> str | None:
    """Why a booted guest cannot run here, or None."""
    if shutil.which(QEMU) is None:
        return f"no {QEMU} (make qemu-guest installs qemu-system-x86)"
    try:
        load_assets()
    except GuestAssetsMissing as exc:
        return str(exc)
    if not Path("/dev/shm").is_dir():
        return "no /dev/shm tmpfs for guest RAM files"
    return None


class QemuLab:
    """Backends ``a``, ``b``, ... under one scratch directory on tmpfs, all TCG (KVM does
    not boot guests on these machines; tests stay on what works everywhere)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dwcp-qemu-test-", dir="/dev/shm"))
        self.backends: dict[str, QemuBackend] = {}
        self.assets = load_assets()

    def backend(self, name: str) -> QemuBackend:
        if name not in self.backends:
            self.backends[name] = QemuBackend(self.dir / name, accel="tcg")
        return self.backends[name]

    def spec(self, fill_percent: int = 0, disk: bool = True, mib: int = GUEST_MIB) -> VmSpec:
        return VmSpec(str(self.assets.kernel), str(self.assets.initrd), mib,
                      guest_cmdline(fill_percent, disk))

    def boot(self, at: str, vm: str, fill_percent: int = 0, checks: int = 2) -> Console:
        """Create ``vm`` at backend ``at`` with a zeroed disk, start it, and wait for
        ``checks`` verified rounds."""
        disk = self.dir / f"{vm}-disk.src"
        with open(disk, "wb") as f:
            f.truncate(DISK_MIB << 20)
        b = self.backend(at)
        b.create(vm, self.spec(fill_percent), [disk])
        b.start(vm, 1)
        return wait_console([b.console_path(vm)], lambda c: len(c.checks) >= checks,
                            BOOT_TIMEOUT, f"{checks} verified rounds",
                            alive=lambda: b.qemu_pid(vm) is not None)

    def console(self, at: str, vm: str) -> Path:
        return self.backend(at).console_path(vm)

    def read(self, logs: list[Path], offsets: list[int] | None = None) -> Console:
        return read_console(logs, offsets or [])

    def close(self) -> None:
        for b in self.backends.values():
            b.close(stop_guests=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def qemu_lab() -> Iterator[QemuLab]:
    """A :class:`QemuLab` whose guests are powered off and files removed at the end."""
    lab = QemuLab()
    try:
        yield lab
    finally:
        lab.close()
