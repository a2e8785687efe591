"""One guest's QEMU process: its QMP session and its device state stream.

:class:`QemuProcess` starts
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

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from federation.vms.backend import VmError
from federation.vms.qmp import QMPClient, QMPError

__all__ = ["QemuProcess", "socket_path", "pid_on", "MIGRATION_TIMEOUT"]

#: A device-state save or load moves well under a MiB (CPU, devices, BIOS and option ROM
#: blocks); 60 s bounds it on a host under load without hanging a migration forever.
MIGRATION_TIMEOUT = 60.0
_CAPS = ("x-ignore-shared", "events")


def socket_path(directory: Path, what: str) -> Path:
    """A short unix socket path for ``what`` of the VM in ``directory``: a socket path has
    at most 107 bytes (sun_path), and a VM directory can be longer than that."""
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    base = Path(tempfile.gettempdir()) / f"dwcp-qemu-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{digest}-{what}.sock"


def pid_on(pidfile: Path, ram: Path) -> int | None:
    """The pid of the QEMU of ``pidfile`` if it still runs on the RAM file ``ram``."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid, ram) else None


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
            if popen is not None:
                self.kill()  # ours and useless without its monitor; a found one is left be
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
        """The QEMU of ``pidfile`` if it still runs on ``ram``, else None. It is sent
        SIGCONT first: a node killed while it throttled the guest (federation.vms.throttle
        stops the whole process for part of every period) may have left it stopped, and
        a stopped QEMU would not answer the QMP greeting, so it would be taken for gone
        and left stopped for good."""
        pid = pid_on(pidfile, ram)
        if pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
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
        else:
            # attached, not our child: wait for it to leave its RAM file, then make sure
            deadline = time.monotonic() + timeout
            while _alive(self.pid, self.ram) and time.monotonic() < deadline:
                time.sleep(0.05)  # a QEMU exits within milliseconds of `quit`
            if _alive(self.pid, self.ram):
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited just now
        qmp = getattr(self, "qmp", None)  # None: QEMU never answered (killed in __init__)
        if qmp is not None:
            qmp.close()
            qmp.path.unlink(missing_ok=True)  # QEMU leaves its listening socket behind

    # ------------------------------------------------------------------ device state

    def _capabilities(self) -> None:
        caps = [{"capability": c, "state": True} for c in _CAPS]
        self.qmp.execute("migrate-set-capabilities", capabilities=caps)

    def _migration_done(self, what: str) -> None:
        try:
            self._wait_migration(what)
        except QMPError as exc:  # QEMU 7.2 exits when an incoming migration fails
            raise VmError(f"{what}: {exc}") from None

    def _wait_migration(self, what: str) -> None:
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
        except QMPError as exc:
            raise VmError(f"saving the device state: {exc}") from None
        finally:
            server.close()
            sock_path.unlink(missing_ok=True)
        if reader.is_alive() or errors:
            raise VmError(f"reading the device state: {errors or 'the stream did not end'}")
        return b"".join(parts)

    def incoming_status(self) -> str:
        """Where this ``-incoming`` QEMU's incoming migration is: "" when none began,
        "completed" when it loaded a device state (it waits paused for ``cont``), else
        QEMU's status of one begun and not finished ("setup", "active", "failed").
        Asked of QEMU itself, so a node restarted between the load and the start sees it
        too."""
        return str(self.qmp.execute("query-migrate").get("status", ""))

    def load_device_state(self, sock_path: Path, state: bytes) -> None:
        """Feed ``state`` to this ``-incoming defer`` QEMU; it stays paused until ``cont``."""
        sock_path.unlink(missing_ok=True)
        try:
            self._capabilities()
            self.qmp.execute("migrate-incoming", uri=f"unix:{sock_path}")
        except QMPError as exc:
            raise VmError(f"loading the device state: {exc}") from None
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
