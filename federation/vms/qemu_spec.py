"""A qemu VM's spec and the QEMU command line it runs with (docs/qemu.md).

:class:`VmSpec` is what an operator writes (``dwcp vm create`` or a TOML file) and what a
migration target receives as the VM's ``machine_spec``; :func:`qemu_argv` is the one
command line of both ends of a migration (the target adds ``-S -incoming defer``).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from federation.vms.backend import VmError

__all__ = ["QEMU", "VmSpec", "qemu_argv"]

QEMU = "qemu-system-x86_64"
#: Bounds on a VM's RAM: QEMU's pc machine needs a few MiB below 1 MiB plus the kernel;
#: 1 TiB is far above anything these hosts (24 GiB) run.
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 16, 1 << 20
#: Options DWCP sets itself; a spec's extra arguments may not change them.
_OWNED = ("-machine", "-M", "-object", "-m", "-qmp", "-serial", "-chardev", "-incoming",
          "-pidfile", "-daemonize", "-kernel", "-initrd", "-append", "-name", "-S",
          "-nodefaults", "-monitor", "-mem-path", "-accel", "-enable-kvm", "-smp")


def _text(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or "," in value or "\n" in value:
        raise VmError(f"{where}.{key}: expected a non-empty string without ',' or newline, "
                      f"got {value!r}")
    return value


@attrs.frozen
class VmSpec:
    """What QEMU runs: kernel, initramfs, command line, RAM, vCPUs, extra QEMU arguments.
    Disks are the VM's ``disk-N`` images, attached as virtio disks in order."""

    kernel: str
    initrd: str
    memory_mib: int
    append: str = "console=ttyS0"
    smp: int = 1
    qemu_args: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, doc: Any, where: str = "spec") -> VmSpec:
        """A spec from parsed JSON or TOML; every error names the field."""
        if not isinstance(doc, dict):
            raise VmError(f"{where}: expected a table, got {type(doc).__name__}")
        unknown = sorted(set(doc) - {"kernel", "initrd", "memory_mib", "append", "smp",
                                     "qemu_args", "disks"})
        if unknown:
            raise VmError(f"{where}: unknown keys {unknown}")
        mib = doc.get("memory_mib")
        if not isinstance(mib, int) or isinstance(mib, bool) or not (
                MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB):
            raise VmError(f"{where}.memory_mib: expected {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}, "
                          f"got {mib!r}")
        smp = doc.get("smp", 1)
        if not isinstance(smp, int) or isinstance(smp, bool) or not 1 <= smp <= 64:
            raise VmError(f"{where}.smp: expected 1..64, got {smp!r}")
        append = doc.get("append", "console=ttyS0")
        if not isinstance(append, str) or "\n" in append:
            raise VmError(f"{where}.append: expected one line of text, got {append!r}")
        args = doc.get("qemu_args", [])
        if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
            raise VmError(f"{where}.qemu_args: expected a list of strings, got {args!r}")
        for a in args:
            if a.split("=")[0] in _OWNED:
                raise VmError(f"{where}.qemu_args: {a!r} is set by DWCP itself")
        return cls(_text(doc, "kernel", where), _text(doc, "initrd", where), mib, append,
                   smp, tuple(args))

    @classmethod
    def from_json(cls, raw: bytes, where: str = "machine spec") -> VmSpec:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise VmError(f"{where}: not JSON: {exc}") from None
        return cls.from_dict(doc, where)

    @classmethod
    def from_toml(cls, path: Path) -> tuple[VmSpec, list[Path]]:
        """A TOML VM spec (docs/qemu.md) and the disk files it names."""
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise VmError(f"{path}: {exc}") from None
        disks = doc.get("disks", [])
        if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
            raise VmError(f"{path}.disks: expected a list of file names, got {disks!r}")
        base = path.parent
        return cls.from_dict(doc, str(path)), [base / d for d in disks]

    def to_json(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True).encode()


def qemu_argv(qemu: str, spec: VmSpec, accel: str, ram: Path, disks: Sequence[Path],
              console: Path, qmp: Path, pidfile: Path, incoming: bool) -> list[str]:
    for path in (ram, console, qmp, pidfile, *disks):
        if "," in str(path):
            raise VmError(f"{path}: QEMU option values cannot hold ',' (rename the directory)")
    argv = [
        qemu, "-nodefaults", "-no-user-config", "-no-reboot",
        "-machine", f"pc,accel={accel},memory-backend=mem",
        "-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,mem-path={ram},share=on",
        "-m", f"{spec.memory_mib}M", "-smp", str(spec.smp),
        "-display", "none", "-monitor", "none",
        "-chardev", f"file,id=console,path={console},append=on", "-serial", "chardev:console",
        "-qmp", f"unix:{qmp},server=on,wait=off", "-pidfile", str(pidfile),
        "-kernel", spec.kernel, "-initrd", spec.initrd, "-append", spec.append,
    ]  # fmt: skip
    for i, disk in enumerate(disks):
        argv += ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback,id=disk{i}"]
    argv += spec.qemu_args
    if incoming:
        # -S: the target stays paused after loading the device state until `cont`
        argv += ["-S", "-incoming", "defer"]
    return argv
