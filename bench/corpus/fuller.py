"""The fuller workload: guest RAM of the self-checking guest with most of its memory in use.

The corpus guest (workload A, ``make corpus``) leaves 78.6 % of its RAM zero; real guests
run with little free memory (issue 17 item 4). This snapshot boots the self-checking guest
of ``make qemu-guest`` (federation/demo/qemu_guest, docs/qemu.md) with ``dwcp.fill=P``:
P % of its free memory becomes 1 MiB ballast files (three of four compressible text,
whose rotation repeats every 36 files, so some pages repeat; one of four random bytes)
before its heartbeat and memory checks run.
Once the ballast is written and the guest ran ``at_s`` seconds, QMP ``stop`` and the RAM
file (a ``memory-backend-file`` on tmpfs) is copied: the guest's physical memory, byte
for byte, page 0 at offset 0, like the corpus snapshots.

Measured (2026-12-07, TCG, shared machine): a 256 MiB guest at ``fill=60`` had 26.8 %
zero pages, at ``fill=85`` (the default) 8.4-8.8 % zero and 22 % duplicate pages, ready
62-240 s after start depending on the load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from federation.demo.qemu_guest.build import guest_cmdline, load_assets
from federation.demo.qemu_guest.console import wait_console
from federation.vms.qemu_machine import QemuProcess
from federation.vms.qemu_spec import QEMU, VmSpec, qemu_argv
from mesh.hde.image import PAGE_SIZE

__all__ = ["FullerSnapshot", "snapshot", "GUEST_MIB", "FILL_PERCENT", "AT_S"]

#: The corpus's small guest size; TCG writes the ballast of a 256 MiB guest in ~40 s.
GUEST_MIB = 256
#: Percent of the guest's free memory written as ballast before the snapshot.
FILL_PERCENT = 85
#: Seconds of guest time (heartbeats / 10) after which the snapshot is taken.
AT_S = 20
BOOT_TIMEOUT_S = 600.0


class FullerSnapshot:
    """A RAM snapshot of the fuller guest in ``path`` (removed by :meth:`close`)."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path = path
        self.info = info

    def close(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


def zero_page_share(path: Path) -> float:
    zero = bytes(PAGE_SIZE)
    pages = zeros = 0
    with open(path, "rb") as f:
        while page := f.read(PAGE_SIZE):
            pages += 1
            zeros += page == zero
    return zeros / max(pages, 1)


def snapshot(mib: int = GUEST_MIB, fill: int = FILL_PERCENT, at_s: int = AT_S,
             directory: Path | None = None) -> FullerSnapshot:
    """Boot the self-checking guest (TCG: these hosts' KVM hangs guests, docs/qemu.md),
    wait for its ballast and ``at_s`` s of guest time, stop it, copy its RAM. Raises
    :class:`~federation.demo.qemu_guest.build.GuestAssetsMissing` without ``make
    qemu-guest``."""
    assets = load_assets()
    spec = VmSpec(str(assets.kernel), str(assets.initrd), mib, guest_cmdline(fill, False))
    work = Path(tempfile.mkdtemp(prefix="dwcp-fuller-", dir=directory or "/dev/shm"))
    ram, console = work / "ram", work / "console.log"
    with open(ram, "wb") as f:
        f.truncate(mib << 20)
    argv = qemu_argv(QEMU, spec, "tcg", ram, [], console, work / "qmp.sock",
                     work / "qemu.pid", False)
    started = time.monotonic()
    proc = QemuProcess.spawn(argv, work / "qemu.log", ram, work / "qmp.sock",
                             work / "qemu.pid")
    try:
        con = wait_console([console], lambda c: c.filled and c.last_heartbeat >= at_s * 10,
                           BOOT_TIMEOUT_S, f"the ballast and {at_s} s of guest time",
                           alive=proc.alive)
        proc.qmp.execute("stop")
        out = work / f"{mib}m-fill{fill}-t{at_s}.raw"
        shutil.copyfile(ram, out)
    finally:
        proc.quit()
    ram.unlink()
    ready_s = time.monotonic() - started
    if con.errors:
        raise RuntimeError(f"the fuller guest reported errors: {list(con.errors)[:3]}")
    info = {"what": f"self-checking guest (make qemu-guest), {mib} MiB, dwcp.fill={fill}, "
                    f"RAM at {at_s} s of guest time after the ballast",
            "guest_mib": mib, "fill_percent": fill, "at_s": at_s,
            "boot_to_snapshot_s": round(ready_s, 1),
            "zero_page_share": round(zero_page_share(out), 4)}  # fmt: skip
    return FullerSnapshot(out, info)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.corpus.fuller OUT``: take a snapshot and keep it at OUT."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--mib", type=int, default=GUEST_MIB)
    p.add_argument("--fill", type=int, default=FILL_PERCENT)
    p.add_argument("--at", type=int, default=AT_S)
    args = p.parse_args(argv)
    snap = snapshot(args.mib, args.fill, args.at)
    try:
        shutil.copyfile(snap.path, args.out)
    finally:
        snap.close()
    print(json.dumps({**snap.info, "path": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
