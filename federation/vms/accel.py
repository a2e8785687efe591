"""Which accelerator a guest runs with: KVM only where a guest really boots under it.

On some hosts ``/dev/kvm`` exists and QMP reports KVM enabled, yet guests die of a KVM
emulation failure under the default CPU model or hang with ``-cpu host`` (these machines,
docs/qemu.md). :func:`probe_accel` therefore boots the kernel once and looks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from federation.vms.backend import VmError

__all__ = ["probe_accel", "PROBE_TIMEOUT"]

_probed: dict[tuple[str, str, str], str] = {}
#: A kernel that runs under KVM reaches init in about a second; under the emulation
#: failure or hang these machines show (docs/qemu.md) it never does. 20 s leaves room
#: for a loaded host.
PROBE_TIMEOUT = 20.0
_PROBE_MARK = b"Run /init as init process"


def probe_accel(qemu: str, kernel: str, initrd: str, workdir: Path,
                timeout: float = PROBE_TIMEOUT) -> str:
    """``kvm`` if this kernel really boots under KVM here, else ``tcg``: boots it with
    ``accel=kvm`` (no disk, a throwaway RAM) until the kernel starts init or ``timeout``.
    A ``/dev/kvm`` that exists is not enough: guests hit KVM emulation failures or hang on
    some hosts. The answer is kept for this process and in ``workdir`` (keyed by the
    QEMU binary and the kernel and initramfs files), since a hang costs the whole timeout.
    """
    key = (qemu, kernel, initrd)
    if key in _probed:
        return _probed[key]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _probed[key] = "tcg"
        return "tcg"
    stamp = []
    for f in (shutil.which(qemu) or qemu, kernel, initrd):
        try:
            st = os.stat(f)
        except OSError:
            raise VmError(f"cannot probe the accelerator: {f} is missing") from None
        stamp.append(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    workdir.mkdir(parents=True, exist_ok=True)
    cached = workdir / f"accel-{digest}"
    try:
        accel = cached.read_text().strip()
        if accel in ("kvm", "tcg"):
            _probed[key] = accel
            return accel
    except OSError:
        pass  # not probed yet on this root
    console = workdir / "kvm-probe-console.log"
    console.unlink(missing_ok=True)
    argv = [qemu, "-nodefaults", "-no-user-config", "-no-reboot", "-machine", "pc,accel=kvm",
            "-m", "128M", "-display", "none", "-monitor", "none",
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 loglevel=7 panic=-1"]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    accel = "tcg"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                proc.wait(0.25)
                break  # QEMU exited: KVM refused or the guest died
            except subprocess.TimeoutExpired:
                pass  # still booting (or hung): look at the console again
            if console.exists() and _PROBE_MARK in console.read_bytes():
                accel = "kvm"
                break
    finally:
        proc.kill()
        proc.wait()
        console.unlink(missing_ok=True)
    cached.write_text(accel + "\n")
    _probed[key] = accel
    return accel
