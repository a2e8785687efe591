"""Boot the corpus guest under QEMU TCG and take consistent RAM snapshots.

The guest's RAM lives in a shared file (``memory-backend-file,share=on``), so a
snapshot is: QMP ``stop``, copy the file, QMP ``cont``. Time is counted from t0,
the instant the host reads the guest's ``DWCP-T0`` line on the serial console
(docs/CORPUS.md), in guest running time: pauses for earlier snapshots are not counted.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs

from federation.vms.qmp import QMPClient

QEMU = "qemu-system-x86_64"
# A copy moves 1 MiB at a time: large enough for memcmp-speed zero detection,
# small enough that a sparse copy of a mostly-zero guest skips most of it.
COPY_BLOCK = 1 << 20
_ZERO_BLOCK = bytes(COPY_BLOCK)
# Booting the cloud kernel under TCG took 8-25 s on the 2-core build machine while
# other jobs ran; 300 s covers a heavily loaded host.
T0_TIMEOUT_S = 300.0


class GuestError(Exception):
    """The guest did not boot, reported a workload failure, or QEMU died."""


@attrs.frozen
class GuestSpec:
    """What to boot: the Debian cloud kernel, the corpus initramfs, RAM size, workload."""

    kernel: Path
    initramfs: Path
    mib: int
    workload: str

    def cmdline(self) -> str:
        return f"console=ttyS0 quiet panic=-1 dwcp.workload={self.workload}"


def qemu_argv(
    spec: GuestSpec,
    qmp_path: Path,
    mem_path: Path | None,
    incoming: str | None = None,
    boot: bool = True,
) -> list[str]:
    """The QEMU command line. Source and ``-incoming`` target use the same one."""
    if mem_path is None:
        backend = f"memory-backend-ram,id=mem,size={spec.mib}M"
    else:
        backend = f"memory-backend-file,id=mem,size={spec.mib}M,mem-path={mem_path},share=on"
    argv = [
        QEMU, "-nodefaults", "-no-user-config", "-no-reboot",
        "-machine", "pc,accel=tcg,memory-backend=mem",
        "-object", backend,
        "-m", f"{spec.mib}M", "-smp", "1",
        "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    if boot:
        argv += ["-kernel", str(spec.kernel), "-initrd", str(spec.initramfs)]
        argv += ["-append", spec.cmdline()]
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` leaving all-zero 1 MiB blocks as holes; atomic rename."""
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while block := fin.read(COPY_BLOCK):
            if block == _ZERO_BLOCK[: len(block)]:
                fout.seek(len(block), os.SEEK_CUR)
            else:
                fout.write(block)
        fout.truncate()
    os.replace(tmp, dst)


class RunningGuest:
    """A booted guest: its QEMU process, serial console reader and QMP session."""

    def __init__(
        self,
        spec: GuestSpec,
        workdir: Path,
        mem_path: Path | None,
        serial_log: Path,
        prefix: Sequence[str] = (),
        incoming: str | None = None,
        boot: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        self.spec = spec
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = workdir / f"qmp-{os.getpid()}-{id(self)}.sock"
        self.qmp_path.unlink(missing_ok=True)
        argv = [*prefix, *qemu_argv(spec, self.qmp_path, mem_path, incoming, boot), *extra]
        self._stderr = open(workdir / "qemu-stderr.log", "ab")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.t0: float | None = None
        self.paused_s = 0.0
        self.iterations: list[str] = []
        self.last_phase: str | None = None
        self.error: str | None = None
        self._t0_seen = threading.Event()
        self._exited = threading.Event()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_serial, args=(self.proc.stdout, serial_log), daemon=True
        )
        self._reader.start()
        try:
            self.qmp = QMPClient(self.qmp_path)
        except Exception:
            self.close()
            raise

    def _read_serial(self, stream: IO[bytes], log_path: Path) -> None:
        with open(log_path, "ab") as log:
            for raw in stream:
                now = time.monotonic()
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace").strip()
                if line.startswith("DWCP-T0") and self.t0 is None:
                    self.t0 = now
                    self._t0_seen.set()
                elif line.startswith("DWCP-PHASE"):
                    self.last_phase = line
                elif line.startswith("DWCP-ITER"):
                    self.iterations.append(line)
                elif line.startswith("DWCP-ERROR") or "Kernel panic" in line:
                    self.error = line
        self._exited.set()
        self._t0_seen.set()

    def _check(self) -> None:
        if self.error is not None:
            raise GuestError(f"guest {self.spec.workload}: {self.error}")
        if self._exited.is_set():
            raise GuestError(f"QEMU exited with status {self.proc.poll()} (see qemu-stderr.log)")

    def wait_t0(self, timeout: float = T0_TIMEOUT_S) -> float:
        if not self._t0_seen.wait(timeout):
            raise GuestError(f"no DWCP-T0 line on the serial console within {timeout} s")
        self._check()
        assert self.t0 is not None
        return self.t0

    def running_since_t0(self) -> float:
        assert self.t0 is not None
        return time.monotonic() - self.t0 - self.paused_s

    def wait_running(self, offset_s: float) -> None:
        """Block until the guest has run ``offset_s`` seconds since t0."""
        while (remaining := offset_s - self.running_since_t0()) > 0:
            # Waits on the serial reader's exit event, so a dying guest ends the wait.
            if self._exited.wait(remaining):
                self._check()
        self._check()

    def stop(self) -> float:
        self.qmp.execute("stop")
        return time.monotonic()

    def cont(self, stopped_at: float) -> None:
        self.qmp.execute("cont")
        self.paused_s += time.monotonic() - stopped_at

    def snapshot(self, mem_path: Path, dest: Path) -> dict[str, Any]:
        """Pause, copy guest RAM to ``dest``, resume; return when and how long it took."""
        stopped = self.stop()
        offset = stopped - (self.t0 or stopped) - self.paused_s
        wall = datetime.now(UTC).isoformat(timespec="milliseconds")
        copy_sparse(mem_path, dest)
        self.cont(stopped)
        return {
            "guest_running_s_since_t0": round(offset, 3),
            "host_utc_at_stop": wall,
            "pause_s": round(time.monotonic() - stopped, 3),
            "iterations_done": len(self.iterations),
            "last_iteration_line": self.iterations[-1] if self.iterations else None,
            "last_phase_line": self.last_phase,
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit")
            except Exception:  # noqa: BLE001 - QEMU may already be gone; killed below
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "qmp"):
            self.qmp.close()
        self._reader.join(timeout=10)
        self._stderr.close()
        self.qmp_path.unlink(missing_ok=True)

    def __enter__(self) -> RunningGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
