"""One guest's QEMU process: its spec, command line, QMP session and device state stream.

:class:`VmSpec` is what an operator writes (``dwcp vm create`` or a TOML file) and what a
migration target receives as the VM's ``machine_spec``. :class:`QemuProcess` starts
``qemu-system-x86_64`` in its own session (the guest outlives a node restart; the node
attaches to it again by its pid file and QMP socket) with guest RAM in a
``memory-backend-file,share=on`` and the serial console appended to a file.

Device state moves through QEMU's own migration stream with ``x-ignore-shared``: the
shared RAM file is not in it (DWCP moves RAM in its rounds), so it holds the CPU, the
devices and QEMU's small private RAM blocks (BIOS, option ROMs). :meth:`save_device_state`
reads it from the source over a unix socket (``migrate unix:...``) and
:meth:`load_device_state` feeds it to a target started with ``-incoming defer``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from federation.vms.backend import VmError
from federation.vms.qmp import QMPClient, QMPError

__all__ = ["QEMU", "VmSpec", "QemuProcess", "probe_accel", "socket_path", "MIGRATION_TIMEOUT"]

QEMU = "qemu-system-x86_64"
#: Bounds on a VM's RAM: QEMU's pc machine needs a few MiB below 1 MiB plus the kernel;
#: 1 TiB is far above anything these hosts (24 GiB) run.
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 16, 1 << 20
#: A device-state save or load moves well under a MiB (CPU, devices, BIOS and option ROM
#: blocks); 60 s bounds it on a host under load without hanging a migration forever.
MIGRATION_TIMEOUT = 60.0
#: Options DWCP sets itself; a spec's extra arguments may not change them.
_OWNED = ("-machine", "-M", "-object", "-m", "-qmp", "-serial", "-chardev", "-incoming",
          "-pidfile", "-daemonize", "-kernel", "-initrd", "-append", "-name", "-S",
          "-nodefaults", "-monitor", "-mem-path", "-accel", "-enable-kvm", "-smp")
_CAPS = ("x-ignore-shared", "events")


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


def socket_path(directory: Path, what: str) -> Path:
    """A short unix socket path for ``what`` of the VM in ``directory``: a socket path has
    at most 107 bytes (sun_path), and a VM directory can be longer than that."""
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    base = Path(tempfile.gettempdir()) / f"dwcp-qemu-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{digest}-{what}.sock"


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


def _alive(pid: int, ram: Path) -> bool:
    """Is ``pid`` a QEMU running on the RAM file ``ram`` (not a recycled pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"mem-path={ram},".encode() in cmdline


class QemuProcess:
    """A QEMU of one VM: started here (:meth:`spawn`) or found running (:meth:`attach`)."""

    def __init__(self, pid: int, ram: Path, qmp_path: Path,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.ram = ram
        self.popen = popen
        try:
            self.qmp = QMPClient(qmp_path, connect_timeout=30.0)
        except QMPError:
            self.kill()
            raise

    @classmethod
    def spawn(cls, argv: list[str], log: Path, ram: Path, qmp_path: Path,
              pidfile: Path) -> QemuProcess:
        qmp_path.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)
        with open(log, "ab") as err:
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
            except OSError as exc:
                raise VmError(f"cannot start {argv[0]}: {exc}") from exc
        try:
            return cls(popen.pid, ram, qmp_path, popen)
        except QMPError as exc:
            tail = log.read_text(errors="replace")[-2000:]
            raise VmError(f"QEMU did not come up ({exc}); {log}: {tail.strip()}") from None

    @classmethod
    def attach(cls, pidfile: Path, ram: Path, qmp_path: Path) -> QemuProcess | None:
        """The QEMU of ``pidfile`` if it still runs on ``ram``, else None."""
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        if not _alive(pid, ram):
            return None
        try:
            return cls(pid, ram, qmp_path)
        except QMPError:
            return None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _alive(self.pid, self.ram)

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])

    def quit(self, timeout: float = 30.0) -> None:
        """Power the guest off (QMP ``quit``) and reap the process; kill it if it lingers."""
        try:
            self.qmp.execute("quit", timeout=timeout)
        except QMPError:
            pass  # already gone, or not answering: killed below
        self._reap(timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone already
        self._reap(30.0)

    def _reap(self, timeout: float) -> None:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.qmp.close()

    # ------------------------------------------------------------------ device state

    def _capabilities(self) -> None:
        caps = [{"capability": c, "state": True} for c in _CAPS]
        self.qmp.execute("migrate-set-capabilities", capabilities=caps)

    def _migration_done(self, what: str) -> None:
        while True:
            ev = self.qmp.wait_event("MIGRATION", MIGRATION_TIMEOUT)
            status = ev.get("data", {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = self.qmp.execute("query-migrate")
                raise VmError(f"{what}: QEMU migration {status}: "
                              f"{info.get('error-desc', 'no reason given')}")

    def save_device_state(self, sock_path: Path) -> bytes:
        """The stopped guest's device state (``migrate`` with x-ignore-shared to a unix
        socket this side reads). The guest stays stopped (runstate ``postmigrate``); a
        ``cont`` resumes it exactly as it was."""
        sock_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(sock_path))
        server.listen(1)
        server.settimeout(MIGRATION_TIMEOUT)
        parts: list[bytes] = []
        errors: list[str] = []

        def read() -> None:
            try:
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(MIGRATION_TIMEOUT)
                    while data := conn.recv(1 << 16):
                        parts.append(data)
            except OSError as exc:
                errors.append(str(exc))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            self._capabilities()
            self.qmp.execute("migrate", uri=f"unix:{sock_path}")
            self._migration_done("saving the device state")
            reader.join(MIGRATION_TIMEOUT)
        finally:
            server.close()
            sock_path.unlink(missing_ok=True)
        if reader.is_alive() or errors:
            raise VmError(f"reading the device state: {errors or 'the stream did not end'}")
        return b"".join(parts)

    def load_device_state(self, sock_path: Path, state: bytes) -> None:
        """Feed ``state`` to this ``-incoming defer`` QEMU; it stays paused until ``cont``."""
        sock_path.unlink(missing_ok=True)
        self._capabilities()
        self.qmp.execute("migrate-incoming", uri=f"unix:{sock_path}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(MIGRATION_TIMEOUT)
                conn.connect(str(sock_path))
                conn.sendall(state)
                conn.shutdown(socket.SHUT_WR)
                self._migration_done("loading the device state")
        except OSError as exc:
            raise VmError(f"sending the device state to QEMU: {exc}") from exc
        finally:
            sock_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- accelerator

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
