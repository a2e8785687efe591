"""``dwcp vm create|start|stop|console``: qemu VMs in a local backend directory.

::

    dwcp vm create NAME --kernel K --initrd I --memory-mib N [--disk D ...] [--append TEXT]
                   [--smp N] [--qemu-arg=ARG ...]      # or: --spec VM.toml
    dwcp vm start NAME [--epoch N] [--accel auto|kvm|tcg]
    dwcp vm stop NAME
    dwcp vm console NAME [--lines N] [--follow]

They act on the qemu backend (:mod:`federation.vms.qemu_backend`) at ``--root`` (default
``$DWCP_QEMU_ROOT`` or ``~/.local/share/dwcp/qemu``) with guest RAM under ``--ram-root``
(default ``/dev/shm/dwcp-qemu-UID``: RAM files belong on tmpfs) — or, with ``--node URL``
(``--api``, or ``--config FILE --name DC``), at a running node through its API, signed with
the operator key of ``--key``: ``create --spec`` stages the VM (the node reads the spec,
its kernel and initramfs and the disks from its own directories) and registers it in the
ledger, which boots it; ``start``/``stop`` power it on or off (``PowerVm``); ``console``
reads its serial console's tail. A guest keeps running
after ``dwcp vm start`` returns; ``stop`` powers it off. ``dwcp vm import`` (a VM of image
files, at a node) is :mod:`federation.cli.ops`; these sub-commands join its ``vm`` group.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.parse
from pathlib import Path

from federation.cli.main import CommandError
from federation.vms.backend import VmError, VmInfo
from federation.vms.qemu_backend import QemuBackend, VmSpec

__all__ = ["add_qemu_commands", "default_root", "default_ram_root"]

#: How often ``dwcp vm console --follow`` looks for new output: the guest's heartbeat
#: period (0.1 s, federation/demo/qemu_guest/selfcheck.sh).
FOLLOW_INTERVAL = 0.1


def default_root() -> Path:
    env = os.environ.get("DWCP_QEMU_ROOT")
    return Path(env) if env else Path.home() / ".local" / "share" / "dwcp" / "qemu"


def default_ram_root() -> Path | None:
    shm = Path("/dev/shm")
    return shm / f"dwcp-qemu-{os.getuid()}" if shm.is_dir() else None


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", metavar="NAME")
    p.add_argument("--root", type=Path, default=None,
                   help="the backend directory ($DWCP_QEMU_ROOT, ~/.local/share/dwcp/qemu)")
    p.add_argument("--ram-root", type=Path, default=None,
                   help="where guest RAM files live (default /dev/shm/dwcp-qemu-UID)")


def add_qemu_commands(vsub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from federation.cli.ops import add_node_options  # ops registers these commands

    c = vsub.add_parser("create", help="create a qemu VM (stopped) from a kernel and initramfs")
    _options(c)
    c.add_argument("--spec", type=Path, help="a TOML VM spec (docs/qemu.md) instead of flags")
    c.add_argument("--kernel", help="the kernel image (bzImage)")
    c.add_argument("--initrd", help="the initramfs")
    c.add_argument("--memory-mib", type=int, help="guest RAM in MiB")
    c.add_argument("--disk", action="append", default=[], type=Path,
                   help="a raw disk image to copy in (repeat for more)")
    c.add_argument("--append", default="console=ttyS0", help="the kernel command line")
    c.add_argument("--smp", type=int, default=1, help="vCPUs")
    c.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="an extra QEMU argument, as --qemu-arg=-cpu --qemu-arg=qemu64")
    add_node_options(c)
    c.set_defaults(func=run_create)
    s = vsub.add_parser("start", help="boot a stopped qemu VM (its QEMU runs on)")
    _options(s)
    s.add_argument("--epoch", type=int, default=None, help="ledger epoch (default: the VM's)")
    s.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="auto: KVM where a guest boots under it, else TCG")
    add_node_options(s)
    s.set_defaults(func=run_start)
    t = vsub.add_parser("stop", help="power a running qemu VM off")
    _options(t)
    add_node_options(t)
    t.set_defaults(func=run_stop)
    o = vsub.add_parser("console", help="print a qemu VM's serial console")
    _options(o)
    o.add_argument("--lines", type=int, default=40, help="the last N lines (0: all)")
    o.add_argument("--follow", "-f", action="store_true", help="keep printing new output")
    add_node_options(o)
    o.set_defaults(func=run_console)


def _backend(args: argparse.Namespace, accel: str = "auto") -> QemuBackend:
    root = args.root or default_root()
    try:
        return QemuBackend(root, args.ram_root or default_ram_root(), accel=accel)
    except (VmError, OSError) as exc:
        raise CommandError(f"{root}: {exc}") from None


def _say(info: VmInfo, backend: QemuBackend) -> None:
    pages = sum(n for _, n in info.layout)
    pid = backend.qemu_pid(info.name)
    print(f"{info.name}: {info.state.value}, epoch {info.epoch}, {pages} pages"
          + (f", qemu pid {pid} ({backend.accel_of(info.name)})" if pid else ""))


def _at_node(args: argparse.Namespace) -> bool:
    return bool(args.api or args.name)


def _remote_create(args: argparse.Namespace) -> int:
    from federation.api.client import ClientError, import_vm
    from federation.cli.ops import node_api

    if args.spec is None or args.kernel or args.initrd or args.memory_mib is not None \
            or args.disk:
        raise CommandError("at a node, a VM is created from --spec FILE (a file under the "
                           "node's import directories; its kernel and initrd under its "
                           "[qemu] guest_files)")
    spec_path = args.spec.resolve()
    try:
        _, disks = VmSpec.from_toml(spec_path)  # checked here too: errors name the field
        doc = import_vm(node_api(args), args.vm, str(spec_path),
                        tuple(str(d.resolve()) for d in disks))
    except (VmError, ClientError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{doc['name']}: {doc['state']}, epoch {doc['epoch']} (created at the node)")
    return 0


def _remote_power(args: argparse.Namespace, on: bool) -> int:
    from federation.cli.ops import node_api
    from federation.node.intents import PowerVm

    api = node_api(args)
    dc = str(api.ok("GET", "/api/status")["dc"])
    verb = "start" if on else "stop"
    doc = api.ok("POST", f"/api/vms/{urllib.parse.quote(args.vm, safe='')}/{verb}",
                 PowerVm(args.vm, dc, on))
    print(f"{doc['name']}: {doc['state']}, epoch {doc['epoch']}")
    return 0


def _remote_console(args: argparse.Namespace) -> int:
    from federation.cli.ops import node_api

    api = node_api(args)
    path = f"/api/vms/{urllib.parse.quote(args.vm, safe='')}/console"
    text = str(api.ok("GET", path)["console"])
    lines = text.splitlines(keepends=True)
    sys.stdout.write("".join(lines[-args.lines:] if args.lines > 0 else lines))
    sys.stdout.flush()
    while args.follow:  # until Ctrl-C (exit 130)
        time.sleep(FOLLOW_INTERVAL)  # polling the node's API for the console's tail
        now = str(api.ok("GET", path)["console"])
        sys.stdout.write(_after(text, now))
        sys.stdout.flush()
        text = now
    return 0


def _after(old: str, new: str) -> str:
    """What ``new`` (a later tail of the same console) adds to ``old``."""
    if new.startswith(old):
        return new[len(old):]
    anchor = old[-256:]  # the tail moved on: find where old's end sits in new
    at = new.rfind(anchor) if anchor else -1
    return new[at + len(anchor):] if at >= 0 else new


def run_create(args: argparse.Namespace) -> int:
    if _at_node(args):
        return _remote_create(args)
    try:
        if args.spec is not None:
            if args.kernel or args.initrd or args.memory_mib is not None or args.disk:
                raise CommandError("--spec or --kernel/--initrd/--memory-mib/--disk, not both")
            spec, disks = VmSpec.from_toml(args.spec)
        else:
            missing = [f"--{n}" for n, v in (("kernel", args.kernel), ("initrd", args.initrd),
                                              ("memory-mib", args.memory_mib)) if v is None]
            if missing:
                raise CommandError(f"missing {', '.join(missing)} (or give --spec FILE)")
            spec = VmSpec.from_dict({
                "kernel": str(Path(args.kernel).resolve()),
                "initrd": str(Path(args.initrd).resolve()), "memory_mib": args.memory_mib,
                "append": args.append, "smp": args.smp, "qemu_args": args.qemu_arg})
            disks = args.disk
        backend = _backend(args)
        info = backend.create(args.vm, spec, disks)
    except VmError as exc:
        raise CommandError(str(exc)) from None
    _say(info, backend)
    backend.close()
    return 0


def run_start(args: argparse.Namespace) -> int:
    if _at_node(args):
        return _remote_power(args, True)
    backend = _backend(args, args.accel)
    try:
        epoch = backend.info(args.vm).epoch if args.epoch is None else args.epoch
        info = backend.start(args.vm, epoch)
    except VmError as exc:
        raise CommandError(str(exc)) from None
    _say(info, backend)
    backend.close()  # the guest runs on; a later command attaches to it
    return 0


def run_stop(args: argparse.Namespace) -> int:
    if _at_node(args):
        return _remote_power(args, False)
    backend = _backend(args)
    try:
        info = backend.stop(args.vm)
    except VmError as exc:
        raise CommandError(str(exc)) from None
    _say(info, backend)
    backend.close()
    return 0


def run_console(args: argparse.Namespace) -> int:
    if _at_node(args):
        return _remote_console(args)
    backend = _backend(args)
    try:
        backend.info(args.vm)
    except VmError as exc:
        raise CommandError(str(exc)) from None
    path = backend.console_path(args.vm)
    backend.close()
    data = path.read_bytes() if path.exists() else b""
    lines = data.splitlines(keepends=True)
    out = sys.stdout.buffer
    out.write(b"".join(lines[-args.lines:] if args.lines > 0 else lines))
    out.flush()
    if not args.follow:
        return 0
    pos = len(data)
    while True:  # until Ctrl-C (exit 130)
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
        if chunk:
            pos += len(chunk)
            out.write(chunk)
            out.flush()
        else:
            time.sleep(FOLLOW_INTERVAL)  # the console is a file QEMU appends to
