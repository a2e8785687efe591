"""The ``qemu`` VM backend: each VM runs in its own ``qemu-system-x86_64`` (docs/qemu.md).

::

    ROOT/NAME/meta.json      state, epoch, layout, migration id (federation.vms.vm_dir)
    ROOT/NAME/vm.json        the VmSpec: kernel, initramfs, command line, RAM, QEMU args
    ROOT/NAME/disk-N.img     raw disks, attached as virtio disks in order
    ROOT/NAME/console.log    the serial console, appended across runs
    ROOT/NAME/qemu.log       QEMU's stderr;  qemu.pid  its pid file
    ROOT/NAME/device-state.bin   the device state saved at the last fence
    ROOT/NAME/device.img     the image the device state travels in: the fence writes it,
                             a migration's final round carries it, the target loads it
    RAM_ROOT/NAME/memory.img guest RAM: QEMU's memory-backend-file (share=on);
                             RAM_ROOT defaults to ROOT/.ram
    ROOT/NAME/retained/*.img a retained copy's images, sealed (with ``seal_key``)

**At rest.** QEMU maps the RAM file and reads and writes the raw disks itself, so a VM's
images are plain while it can run here. Once it is retired (its QEMU powered off) or an
incoming copy is discarded, a backend with the node's at-rest key (``seal_key``) seals
every image into ``retained/`` (:mod:`federation.vms.sealing`), records ``sealed`` in
meta.json and removes the plain files (the RAM file included); a later migration back
unseals them into plain files before it writes. Each step is atomic and the meta write
decides which set counts, so a crash anywhere leaves one whole copy, and the next
backend finishes the step (plain leftovers of a sealed copy are removed, a retired copy
not yet sealed is sealed).

Guest RAM is a file QEMU maps shared, so the node reads the memory image while the guest
runs (``open_images``) and a migration target writes the image QEMU will run on before
QEMU loads anything. ``RAM_ROOT`` belongs on tmpfs: with the RAM file on a disk, the
kernel's writeback of guest pages stalled QMP ``stop`` for 12 s (bench.corpus.build).

State machine (federation.vms.backend): ``start`` boots a STOPPED VM from its kernel (RAM
zeroed, as at power-on) or resumes an INCOMING one from the source's device state;
``fence`` is QMP ``stop`` (QEMU drains and flushes its disks before it answers);
``release_fence`` is ``cont``; ``retire`` powers the fenced QEMU off; ``stop`` powers a
running guest off. Dirty pages are found by rescanning (:mod:`federation.vms.dirty_scan`).
QEMU runs in its own session, so a guest outlives its node; a new backend on the same
root attaches to it again through its pid file and QMP socket.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from federation.vms.accel import probe_accel
from federation.vms.backend import (
    DEVICE,
    MEMORY,
    FencedError,
    VmError,
    VmInfo,
    VmState,
    check_image_name,
    check_vm_name,
    disk_name,
)
from federation.vms.dirty_scan import PageScan
from federation.vms.image_backend import map_writable
from federation.vms.qemu_machine import QemuProcess, pid_on, socket_path
from federation.vms.qemu_spec import QEMU, VmSpec, qemu_argv
from federation.vms.qmp import QMPClient, QMPError
from federation.vms.sealed_image import SealedImage, seal_file, unseal_file
from federation.vms.sealing import SealError, SealKey
from federation.vms.throttle import DutyCycle
from federation.vms.vm_dir import (
    DIR_MODE,
    FILE_MODE,
    META,
    atomic_write,
    check_start,
    fence_needed,
    fsync_dir,
    info_of,
    new_meta,
    read_meta,
    release_needed,
    remove_vm_dir,
    retire_needed,
    write_meta,
)
from mesh.hde.image import PAGE_SIZE, Image, ImageError, ImageWriter, open_image

__all__ = ["QemuBackend", "VmSpec"]

SPEC = "vm.json"
DEVICE_STATE = "device-state.bin"
#: Pages of the device image: 4 MiB. QEMU's stream without RAM (x-ignore-shared) was
#: 320-370 KB for the self-checking guest (docs/qemu.md: mostly the BIOS and option ROM
#: blocks, which are not in the shared memory backend); the rest is zero pages, which HDE
#: marks and never sends.
DEVICE_PAGES = 1024
#: The device image starts with this magic, the state's length (8 bytes, big-endian) and
#: the wall-clock time of the source's QMP ``stop`` (a big-endian double), from which the
#: target measures the downtime when it sends ``cont``.
_DEVICE_MAGIC = b"DWCPDEV2"
_DEVICE_HEADER = 24
RETAINED = "retained"
#: QEMU runstates in which the guest executes or will on its own.
_RUNNING = ("running", "debug")


class QemuBackend:
    """VMs as QEMU processes under ``root`` (implements :class:`federation.vms.backend.VmBackend`).

    ``accel``: ``"auto"`` (KVM where a guest boots under it, else TCG:
    :func:`federation.vms.accel.probe_accel`), ``"kvm"`` or ``"tcg"``.

    What a migration source's spec may ask of this host (``prepare_incoming``):
    ``guest_files`` (None: anything) are the directories its kernel and initramfs must lie
    in, ``allowed_args`` (None: anything) the only extra QEMU arguments it may carry. A
    node sets both from its node config (``[qemu]``): without them a Byzantine source
    could boot a guest on any host file and read it back."""

    def __init__(self, root: Path | str, ram_root: Path | str | None = None,
                 accel: str = "auto", qemu: str = QEMU,
                 seal_key: SealKey | None = None, *,
                 guest_files: Sequence[Path] | None = None,
                 allowed_args: Sequence[str] | None = None) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise VmError(f"accel: expected auto, kvm or tcg, got {accel!r}")
        self.guest_files = (None if guest_files is None
                            else tuple(os.path.realpath(d) for d in guest_files))
        self.allowed_args = None if allowed_args is None else frozenset(allowed_args)
        self.root = Path(root)
        self.ram_root = self.root / ".ram" if ram_root is None else Path(ram_root)
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.ram_root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.accel = accel
        self.qemu = qemu
        self._lock = threading.RLock()
        self._procs: dict[str, QemuProcess] = {}
        self._throttles: dict[str, DutyCycle] = {}
        self._scans: dict[str, PageScan] = {}
        #: VM -> (migration id, stop time) of a stop_for_fence whose fence is not written
        self._stopped: dict[str, tuple[str, float]] = {}
        self.seal_key = seal_key
        self._attach_all()
        self._finish_sealing()

    # ------------------------------------------------------------------ files

    def _dir(self, name: str) -> Path:
        return self.root / check_vm_name(name)

    def ram_path(self, name: str) -> Path:
        return self.ram_root / check_vm_name(name) / "memory.img"

    def console_path(self, name: str) -> Path:
        return self._dir(name) / "console.log"

    def _disks(self, info: VmInfo) -> list[Path]:
        d = self._dir(info.name)
        return [d / f"{img}.img" for img, _ in info.layout if img.startswith("disk-")]

    def _meta(self, name: str) -> dict[str, Any]:
        return read_meta(self._dir(name), name)

    def spec(self, name: str) -> VmSpec:
        path = self._dir(name) / SPEC
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise VmError(f"VM {name!r}: no spec at {path}: {exc}") from None
        return VmSpec.from_json(raw, str(path))

    def _image_path(self, name: str, img: str) -> Path:
        return self.ram_path(name) if img == MEMORY else self._dir(name) / f"{img}.img"

    # ------------------------------------------------------------------ queries

    def list_vms(self) -> list[VmInfo]:
        return [self.info(d.name) for d in sorted(self.root.iterdir())
                if d.is_dir() and (d / META).exists()]

    def info(self, name: str) -> VmInfo:
        return info_of(self._meta(name))

    def guest_running(self, name: str) -> bool:
        """Does the VM's QEMU run and execute the guest (not stopped, not paused)?"""
        with self._lock:
            proc = self._procs.get(name)
            if proc is None or not proc.alive():
                return False
            try:
                return proc.status() in _RUNNING
            except QMPError:
                return False

    def qmp(self, name: str) -> QMPClient:
        """The QMP session to the VM's QEMU (a monitor takes one client: tools that drive
        QEMU directly use this one)."""
        proc = self._proc(name)
        if proc is None:
            raise VmError(f"VM {name!r}: no QEMU runs it here")
        return proc.qmp

    def qemu_pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc is not None and proc.alive() else None

    def accel_of(self, name: str) -> str:
        """The accelerator the VM's QEMU runs with (``kvm``/``tcg``), "" if never started."""
        return str(self._meta(name).get("accel", ""))

    def open_images(self, name: str) -> dict[str, Image]:
        meta = self._meta(name)
        info = info_of(meta)
        if meta.get("sealed"):
            if self.seal_key is None:
                raise VmError(f"VM {name!r}: its retained copy is sealed and this backend "
                              "has no at-rest key")
            out: dict[str, Image] = {}
            try:
                for img, _ in info.layout:
                    out[img] = SealedImage(self._dir(name) / RETAINED / f"{img}.img",
                                           self.seal_key, f"{name}/{img}")
            except (SealError, OSError) as exc:
                for opened in out.values():
                    opened.close()
                raise VmError(f"VM {name!r}: {exc}") from None
            return out
        return {img: open_image(self._image_path(name, img), f"{name}/{img}")
                for img, _ in info.layout}

    # ------------------------------------------------------------------ at rest

    def _seal(self, name: str, meta: dict[str, Any]) -> None:
        """Seal a retained copy whose QEMU is off (module docstring): each image into
        ``retained/``, then ``sealed`` in meta.json, then the plain files go."""
        if self.seal_key is None or meta.get("sealed"):
            return
        info = info_of(meta)
        sealed = self._dir(name) / RETAINED
        sealed.mkdir(mode=DIR_MODE, exist_ok=True)
        for img, _ in info.layout:
            seal_file(self._image_path(name, img), sealed / f"{img}.img", self.seal_key)
        meta["sealed"] = True
        write_meta(self._dir(name), meta)
        self._drop_plain(name, info)

    def _seal_now(self, name: str, meta: dict[str, Any]) -> None:
        """:meth:`_seal` as a retirement's last step: a copy that cannot be sealed now (a
        full disk) stays plain, the retirement stands, and the next backend on this root
        seals it (:meth:`_finish_sealing`)."""
        try:
            self._seal(name, meta)
        except (OSError, ImageError, SealError):
            shutil.rmtree(self._dir(name) / RETAINED, ignore_errors=True)

    def _drop_plain(self, name: str, info: VmInfo) -> None:
        for img, _ in info.layout:
            self._image_path(name, img).unlink(missing_ok=True)

    def _unseal(self, name: str, meta: dict[str, Any]) -> None:
        """A sealed retained copy becomes plain images again (a migration back will write
        and run them): plain files first, then meta.json without ``sealed``, then
        ``retained/`` goes."""
        if not meta.get("sealed"):
            return
        if self.seal_key is None:
            raise VmError(f"VM {name!r}: its retained copy is sealed and this backend has "
                          "no at-rest key")
        info = info_of(meta)
        self.ram_path(name).parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for img, _ in info.layout:
            try:
                unseal_file(self._dir(name) / RETAINED / f"{img}.img",
                            self._image_path(name, img), self.seal_key)
            except (SealError, OSError) as exc:
                raise VmError(f"VM {name!r}: {exc}") from None
        meta["sealed"] = False
        write_meta(self._dir(name), meta)
        shutil.rmtree(self._dir(name) / RETAINED, ignore_errors=True)

    def _finish_sealing(self) -> None:
        """After a crash: a sealed copy loses its plain leftovers, a copy no longer sealed
        its ``retained/`` leftover, and a retired copy not sealed yet is sealed."""
        for d in sorted(self.root.iterdir()):
            if not (d.is_dir() and (d / META).exists()):
                continue
            try:
                meta = self._meta(d.name)
                info = info_of(meta)
            except VmError:
                continue
            if meta.get("sealed"):
                self._drop_plain(d.name, info)
                continue
            shutil.rmtree(d / RETAINED, ignore_errors=True)
            if info.state is VmState.RETIRED and d.name not in self._procs:
                try:
                    self._seal(d.name, meta)
                except (OSError, ImageError, SealError):
                    continue  # the plain copy stays; its images may be gone (listed as is)

    def machine_spec(self, name: str) -> bytes:
        return self.spec(name).to_json()

    # ------------------------------------------------------------------ creating VMs

    def create(self, name: str, spec: VmSpec, disks: Sequence[Path] = (),
               epoch: int = 0) -> VmInfo:
        """A new STOPPED VM: its spec, copies of ``disks`` and a zeroed (sparse) RAM file.

        Built in ``ROOT/.NAME.creating`` and renamed into place: a crash leaves no VM or the
        whole VM (a leftover staging directory is removed by the next create; a RAM file
        under RAM_ROOT without its VM is overwritten by it)."""
        final = self._dir(name)
        if final.exists():
            raise VmError(f"VM {name!r} already exists in {self.root}")
        self._check_spec(name, spec)
        layout = [(MEMORY, spec.memory_mib * (1 << 20) // PAGE_SIZE)]
        for i, src in enumerate(disks):
            try:
                size = Path(src).stat().st_size
            except OSError as exc:
                raise VmError(f"VM {name!r}: disk {src}: {exc}") from exc
            if size == 0 or size % PAGE_SIZE:
                raise VmError(f"VM {name!r}: disk {src} is {size} bytes, "
                              f"not a positive multiple of {PAGE_SIZE}")
            layout.append((disk_name(i), size // PAGE_SIZE))
        layout.append((DEVICE, DEVICE_PAGES))
        staging = self.root / f".{name}.creating"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=DIR_MODE)
        for i, src in enumerate(disks):
            dst = staging / f"{disk_name(i)}.img"
            shutil.copyfile(src, dst)  # copy_file_range: never the whole file in memory
            os.chmod(dst, FILE_MODE)  # (inside the 0700 staging directory meanwhile)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
        with open(os.open(staging / f"{DEVICE}.img", os.O_RDWR | os.O_CREAT, FILE_MODE),
                  "w+b") as f:
            f.truncate(DEVICE_PAGES * PAGE_SIZE)
        atomic_write(staging / SPEC, spec.to_json() + b"\n")
        write_meta(staging, new_meta(name, layout, VmState.STOPPED, epoch))
        self._zero_ram(name, layout[0][1])
        os.replace(staging, final)
        fsync_dir(self.root)
        return self.info(name)

    def _zero_ram(self, name: str, pages: int) -> None:
        """A RAM file of ``pages`` zero pages (a hole: nothing allocated until written)."""
        ram = self.ram_path(name)
        ram.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with open(os.open(ram, os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w+b") as f:
            f.truncate(pages * PAGE_SIZE)

    def import_vm(self, name: str, memory: Path, disks: Sequence[Path] = (),
                  epoch: int = 0) -> VmInfo:
        raise VmError(f"VM {name!r}: a qemu VM is created from a spec (dwcp vm create) or "
                      "arrives by migration; a memory image alone cannot run")

    def prepare_incoming(self, name: str, layout: Sequence[tuple[str, int]],
                         migration_id: str, machine: bytes = b"") -> dict[str, ImageWriter]:
        """The spec is written before meta.json: a crash between the two leaves a directory
        without meta.json, which no listing shows and the next prepare reuses."""
        for img, count in layout:
            check_image_name(img)
            if count <= 0:
                raise VmError(f"VM {name!r}: image {img} needs a positive page count")
        if not layout or layout[0][0] != MEMORY:
            raise VmError(f"VM {name!r}: a qemu VM's layout starts with its memory")
        d = self._dir(name)
        spec = VmSpec.from_json(machine) if machine else None
        if spec is not None and spec.memory_mib * (1 << 20) // PAGE_SIZE != layout[0][1]:
            raise VmError(f"VM {name!r}: the spec's {spec.memory_mib} MiB of RAM "
                          f"is not the layout's {layout[0][1]} pages")
        if spec is None and not (d / SPEC).exists():
            raise VmError(f"VM {name!r}: a qemu target needs the source's machine spec")
        if spec is not None:
            self._check_spec(name, spec)
        with self._lock:
            if (d / META).exists():
                meta = self._meta(name)
                state = info_of(meta).state
                if state not in (VmState.RETIRED, VmState.INCOMING):
                    raise VmError(f"VM {name!r} is {state.value} here; cannot receive it")
                if state is VmState.INCOMING and meta["migration_id"] != migration_id:
                    self._power_off(name)  # an older attempt's QEMU runs the old layout
                self._unseal(name, meta)  # QEMU runs plain images
                meta.update(state=VmState.INCOMING.value, migration_id=migration_id,
                            layout=[[n, c] for n, c in layout])
            else:
                d.mkdir(mode=DIR_MODE, exist_ok=True)
                meta = new_meta(name, layout, VmState.INCOMING, 0, migration_id)
            if spec is not None:
                atomic_write(d / SPEC, spec.to_json() + b"\n")
            self.ram_path(name).parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            writers: dict[str, ImageWriter] = {
                img: map_writable(self._image_path(name, img), count, f"{name}/{img}")
                for img, count in layout}
            write_meta(d, meta)
            return writers

    def _check_spec(self, name: str, spec: VmSpec) -> None:
        """A spec (an operator's, or a migration source's) names files of this host and
        QEMU arguments: this host boots only files under its ``guest_files`` and runs only
        its ``allowed_args``."""
        for field, what in (("kernel", spec.kernel), ("initrd", spec.initrd)):
            real = os.path.realpath(what)
            if self.guest_files is not None and not any(
                    real != d and os.path.commonpath([real, d]) == d for d in self.guest_files):
                raise VmError(f"VM {name!r}: the spec's {field} {what} is not under this "
                              "node's guest file directories ([qemu] guest_files)")
            if not Path(real).is_file():
                raise VmError(f"VM {name!r}: the spec's {field} {what} is not a file here")
        if self.allowed_args is not None:
            extra = [a for a in spec.qemu_args if a not in self.allowed_args]
            if extra:
                raise VmError(f"VM {name!r}: the spec's qemu_args {extra} are not allowed "
                              "here ([qemu] allowed_args)")

    def discard_incoming(self, name: str, migration_id: str) -> None:
        if not (self._dir(name) / META).exists():
            return  # the copy was never prepared: nothing to discard
        with self._lock:
            meta = self._meta(name)
            if meta["state"] == VmState.RETIRED.value:
                return
            if meta["state"] != VmState.INCOMING.value or meta["migration_id"] != migration_id:
                raise VmError(f"VM {name!r} is not incoming for migration {migration_id!r}")
            self._power_off(name)
            # A crash right before this write leaves INCOMING with no QEMU: the session's
            # restore discards it again (idempotent); after it, a RETIRED store.
            meta["state"] = VmState.RETIRED.value
            write_meta(self._dir(name), meta)
            self._seal_now(name, meta)

    # ------------------------------------------------------------------ dirty tracking

    def dirty_by_content(self, name: str) -> bool:
        """Dirty pages are found by comparing content (federation.vms.dirty_scan), not by
        write events: a migration's rounds compare the live images with what they sent
        (dirty_scan.SentDigests), not trust ``dirty_since`` (an A, B, A page looks clean)."""
        return True

    def dirty_mark(self, name: str) -> int:
        images = self.open_images(name)
        try:
            return self._scans.setdefault(name, PageScan()).mark(images)
        finally:
            for img in images.values():
                img.close()

    def dirty_since(self, name: str, mark: int) -> dict[str, list[int]]:
        images = self.open_images(name)
        try:
            return self._scans.setdefault(name, PageScan()).since(images, mark)
        finally:
            for img in images.values():
                img.close()

    # ------------------------------------------------------------------ auto-converge

    def throttle(self, name: str, percent: int) -> None:
        """Run the guest's vCPUs only ``100 - percent`` % of the time (0: not throttled),
        by duty-cycling its QEMU (:mod:`federation.vms.throttle`). A fence, a release and a
        retire end it."""
        with self._lock:
            old = self._throttles.pop(name, None)
            if old is not None:
                old.stop()
            if percent <= 0:
                return
            proc = self._proc(name)
            if proc is None or self.info(name).state is not VmState.RUNNING:
                return
            self._throttles[name] = DutyCycle(proc.pid, percent)

    def throttled(self, name: str) -> int:
        """The VM's throttle in percent (0: none)."""
        cycle = self._throttles.get(name)
        return 0 if cycle is None else cycle.percent

    # ------------------------------------------------------------------ processes

    def _resolve_accel(self, spec: VmSpec) -> str:
        if self.accel != "auto":
            return self.accel
        return probe_accel(self.qemu, spec.kernel, spec.initrd, self.root / ".probe")

    def _spawn(self, name: str, incoming: bool) -> QemuProcess:
        d = self._dir(name)
        other = pid_on(d / "qemu.pid", self.ram_path(name))
        if other is not None:
            # never a second QEMU (or a zeroed RAM file) under a guest that still runs
            raise VmError(f"VM {name!r}: QEMU pid {other} still runs on its RAM file and "
                          "does not answer QMP; stop it first")
        info, spec = self.info(name), self.spec(name)
        if not incoming:
            self._zero_ram(name, info.layout[0][1])  # power-on: RAM starts zeroed
        accel = self._resolve_accel(spec)
        argv = qemu_argv(self.qemu, spec, accel, self.ram_path(name), self._disks(info),
                         self.console_path(name), socket_path(d, "qmp"), d / "qemu.pid",
                         incoming)
        proc = QemuProcess.spawn(argv, d / "qemu.log", self.ram_path(name),
                                 socket_path(d, "qmp"), d / "qemu.pid")
        self._procs[name] = proc
        meta = self._meta(name)
        meta["accel"] = accel
        write_meta(d, meta)
        return proc

    def _proc(self, name: str) -> QemuProcess | None:
        proc = self._procs.get(name)
        if proc is not None and not proc.alive():
            proc.kill()  # reap it and close its QMP session
            del self._procs[name]
            return None
        return proc

    def _power_off(self, name: str) -> None:
        cycle = self._throttles.pop(name, None)
        if cycle is not None:
            cycle.stop()
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.quit()

    def _attach_all(self) -> None:
        """Find the QEMUs a previous backend on this root left running, and finish what a
        crash interrupted: a RETIRED VM's QEMU is powered off; a RUNNING VM's QEMU that is
        paused (a crash between loading the device state and ``cont``) is resumed."""
        for d in sorted(self.root.iterdir()):
            if not (d.is_dir() and (d / META).exists()):
                continue
            try:
                info = self.info(d.name)
            except VmError:
                continue  # listed by list_vms with its error; nothing to attach
            proc = QemuProcess.attach(d / "qemu.pid", self.ram_path(d.name),
                                      socket_path(d, "qmp"))
            if proc is None:
                continue
            self._procs[d.name] = proc
            if info.state in (VmState.RETIRED, VmState.STOPPED):
                self._power_off(d.name)
                continue
            try:
                if info.state is VmState.RUNNING and proc.status() not in _RUNNING:
                    proc.qmp.execute("cont")
            except QMPError:
                # a QEMU that does not answer is not ours to drive: the VM's next start
                # or fence finds no QEMU and says so
                del self._procs[d.name]
                proc.qmp.close()

    # ------------------------------------------------------------------ running

    def start(self, name: str, epoch: int, device_state: bytes = b"") -> VmInfo:
        with self._lock:
            meta = self._meta(name)
            info = info_of(meta)
            check_start(info, epoch)
            proc = self._proc(name)
            if info.state is VmState.RUNNING and proc is not None:
                if device_state:
                    raise VmError(f"VM {name!r} already runs here; device state refused")
                meta["epoch"] = epoch
                write_meta(self._dir(name), meta)
                return info_of(meta)
            stopped_at = 0.0
            if info.state is VmState.INCOMING:
                given = bool(device_state)
                if not device_state:
                    device_state, stopped_at = self._read_device_image(name, info)
                if not device_state:
                    raise VmError(f"VM {name!r} is incoming: it starts from the source's "
                                  "device state")
                proc, loaded = self._incoming(name, proc)
                if given or not loaded:
                    proc.load_device_state(socket_path(self._dir(name), "incoming"),
                                           device_state)
                assert proc is not None
            elif device_state:
                raise VmError(f"VM {name!r} is {info.state.value}: device state is for an "
                              "incoming VM only")
            else:
                if proc is not None:
                    self._power_off(name)
                proc = self._spawn(name, incoming=False)
            # Durable before the guest runs: a crash right after this write leaves a paused
            # QEMU that the next backend resumes (_attach_all), or a cold VM it boots again.
            t_meta = time.time()
            meta = self._meta(name)
            arrived = meta["migration_id"] if info.state is VmState.INCOMING else ""
            meta.update(state=VmState.RUNNING.value, epoch=epoch, migration_id="")
            write_meta(self._dir(name), meta)
            t_cont = time.time()
            try:
                if proc.status() not in _RUNNING:
                    proc.qmp.execute("cont")
            except QMPError as exc:
                raise VmError(f"VM {name!r}: QMP cont failed: {exc}") from exc
            if arrived and stopped_at > 0:
                cont_at = time.time()
                downtime = max(0.0, cont_at - stopped_at)
                # the start's own split: the durable RUNNING write, then QMP status and cont
                meta["arrival"] = {"migration_id": arrived,
                                   "downtime_ms": round(downtime * 1000, 1),
                                   "stopped_at": stopped_at, "cont_at": cont_at,
                                   "start_meta_ms": round((t_cont - t_meta) * 1000, 1),
                                   "start_cont_ms": round((cont_at - t_cont) * 1000, 1)}
                write_meta(self._dir(name), meta)  # a report: a crash before it loses only it
            return info_of(meta)

    def _incoming(self, name: str, proc: QemuProcess | None) -> tuple[QemuProcess, bool]:
        """The INCOMING VM's QEMU to load the device state into, and whether it holds it
        already. QEMU takes one ``migrate-incoming`` per process: one that a node killed
        mid-load began and never finished ("The incoming migration has already been
        started" to the next) is powered off, and a fresh ``-incoming defer`` QEMU starts
        on the same RAM file (with ``-incoming`` QEMU writes nothing into it; the device
        state is in the device image). Seen in the 20-migration acceptance: the target
        killed between its load's ``migrate-incoming`` and the state's last byte."""
        if proc is None:
            return self._spawn(name, incoming=True), False
        try:
            status = proc.incoming_status()
        except QMPError as exc:
            raise VmError(f"QMP query-migrate failed: {exc}") from exc
        if status == "completed":
            return proc, True
        # QEMU reports no status while it listens for a begun load's stream; the load's
        # socket, which it removes when done, is left by a node killed in between
        begun = socket_path(self._dir(name), "incoming").exists()
        if not begun and status in ("", "none"):
            return proc, False
        self._power_off(name)
        return self._spawn(name, incoming=True), False

    def load_device(self, name: str, migration_id: str) -> None:
        """Load the device state the final round carried (the verified device image) into
        the INCOMING VM's waiting QEMU, while the ledger commits: the guest stays paused
        until :meth:`start`'s ``cont``, which then loads nothing. Idempotent (QEMU says
        whether it loaded one); an abort powers the loaded QEMU off (discard_incoming)."""
        with self._lock:
            info = self.info(name)
            if info.state is not VmState.INCOMING or info.migration_id != migration_id:
                raise VmError(f"VM {name!r} is not incoming for migration {migration_id!r}")
            proc, loaded = self._incoming(name, self._proc(name))
            if loaded:
                return
            state, _ = self._read_device_image(name, info)
            if not state:
                raise VmError(f"VM {name!r}: its device image holds no device state")
            proc.load_device_state(socket_path(self._dir(name), "incoming"), state)

    def prepare_machine(self, name: str) -> None:
        """Start the INCOMING VM's QEMU (``-incoming defer``, paused) ahead of its device
        state, so QEMU's start-up stays out of the downtime. It maps the RAM file the
        migration is writing; with ``-incoming`` QEMU writes nothing into guest RAM."""
        with self._lock:
            info = self.info(name)
            if info.state is not VmState.INCOMING:
                raise VmError(f"VM {name!r} is {info.state.value}, not incoming")
            if self._proc(name) is None:
                self._spawn(name, incoming=True)

    def fence(self, name: str, migration_id: str) -> VmInfo:
        """:meth:`stop_for_fence`, then the device state saved into the device image (again
        after a crash that may have cut it short: the save itself happens once)."""
        with self._lock:
            info = self.stop_for_fence(name, migration_id)
            if info.state is VmState.FENCED and info.migration_id == migration_id:
                self._write_device_image(name, info)
            return info

    def stop_for_fence(self, name: str, migration_id: str, durable: bool = True) -> VmInfo:
        """The first half of :meth:`fence`: QMP ``stop`` and the durable fence, not yet the
        device state. The guest's RAM and disks no longer change from here, so a caller may
        scan them while :meth:`fence` saves the device state (QEMU's stream with
        ``x-ignore-shared`` does not touch the shared RAM file).

        ``durable=False``: the stop alone; :meth:`fence` (on another thread, beside the
        scan) then writes the fence, with this stop's time. Until then meta.json still
        says RUNNING: a node killed in between leaves a paused guest that the next backend
        resumes, as before any fence (nothing of this fence left the node: its caller
        answers only after :meth:`fence`), and :meth:`release_fence` resumes it."""
        with self._lock:
            meta = self._meta(name)
            info = info_of(meta)
            if not fence_needed(info, migration_id):
                return info
            held = self._stopped.get(name)
            if held is None or held[0] != migration_id:
                self.throttle(name, 0)
                proc = self._proc(name)
                stopped_at = 0.0
                if proc is not None:
                    # the guest may stop any moment from here on: the downtime starts now
                    stopped_at = time.time()
                    try:
                        proc.qmp.execute("stop")  # QEMU drains and flushes the disks first
                    except QMPError as exc:
                        raise VmError(f"VM {name!r}: QMP stop failed: {exc}") from exc
                held = self._stopped[name] = (migration_id, stopped_at)
            if not durable:
                return info
            del self._stopped[name]
            if held[1]:
                meta["stopped_at"] = held[1]
            # A crash right after this write leaves the guest stopped and fenced: only the
            # ledger's abort (release_fence) or commit (retire) moves it on.
            meta.update(state=VmState.FENCED.value, migration_id=migration_id)
            write_meta(self._dir(name), meta)
            return info_of(meta)

    def _write_device_image(self, name: str, info: VmInfo) -> None:
        """The fenced VM's device state into its device image (if its layout has one), so
        the final round carries it. Idempotent: ``device_state`` saves once per migration.
        Not synced: a crash before the final round read it fences again, which rewrites it."""
        pages = dict(info.layout).get(DEVICE)
        if pages is None:
            return
        state = self.device_state(name, info.migration_id)
        room = pages * PAGE_SIZE - _DEVICE_HEADER
        if len(state) > room:
            raise VmError(f"VM {name!r}: its device state is {len(state)} bytes; the device "
                          f"image holds {room}")
        stopped = float(self._meta(name).get("stopped_at", 0.0))
        raw = (_DEVICE_MAGIC + len(state).to_bytes(8, "big") + struct.pack(">d", stopped)
               + state)
        with open(self._image_path(name, DEVICE), "r+b") as f:
            f.write(raw + bytes(pages * PAGE_SIZE - len(raw)))

    def _read_device_image(self, name: str, info: VmInfo) -> tuple[bytes, float]:
        """The device state a migration wrote into the incoming device image (b"": none)
        and the wall-clock time the source stopped the guest."""
        if DEVICE not in dict(info.layout):
            return b"", 0.0
        with open(self._image_path(name, DEVICE), "rb") as f:
            head = f.read(_DEVICE_HEADER)
            if len(head) < _DEVICE_HEADER or head[:8] != _DEVICE_MAGIC:
                raise VmError(f"VM {name!r}: its device image holds no device state")
            size = int.from_bytes(head[8:16], "big")
            (stopped,) = struct.unpack(">d", head[16:24])
            state = f.read(size)
        if len(state) != size:
            raise VmError(f"VM {name!r}: its device image is cut short ({len(state)} of "
                          f"{size} bytes)")
        return state, stopped

    def note_arrival(self, name: str, migration_id: str,
                     window: Callable[[float, float], dict[str, float]]) -> None:
        """Add the stop window's phases to the arrival of ``migration_id``: ``window`` is
        given the source's stop time and this node's cont time (wall clock)."""
        with self._lock:
            meta = self._meta(name)
            got = meta.get("arrival")
            if not isinstance(got, dict) or got.get("migration_id") != migration_id:
                return
            got["stop_window_ms"] = window(float(got["stopped_at"]), float(got["cont_at"]))
            write_meta(self._dir(name), meta)

    def arrival(self, name: str) -> dict[str, Any] | None:
        """How the VM's last incoming migration ended here: ``migration_id`` and
        ``downtime_ms`` (the source's ``stop`` to this ``cont``, in wall-clock time: exact
        on one host; across hosts their clocks' offset adds to it), or None."""
        got = self._meta(name).get("arrival")
        return dict(got) if isinstance(got, dict) else None

    def device_state(self, name: str, migration_id: str) -> bytes:
        with self._lock:
            meta = self._meta(name)
            info = info_of(meta)
            if info.state is not VmState.FENCED or info.migration_id != migration_id:
                raise VmError(f"VM {name!r} is not fenced by migration {migration_id!r}")
            saved = self._dir(name) / DEVICE_STATE
            if meta.get("device_state_of") == migration_id and saved.exists():
                return saved.read_bytes()  # saved once: QEMU is past its migration now
            proc = self._proc(name)
            if proc is None:
                raise VmError(f"VM {name!r}: its QEMU is gone; no device state to save")
            state = proc.save_device_state(socket_path(self._dir(name), "save"))
            # A crash right after these writes leaves the state saved for this migration:
            # a retry returns the same bytes instead of migrating QEMU a second time.
            atomic_write(saved, state)
            meta["device_state_of"] = migration_id
            write_meta(self._dir(name), meta)
            return state

    def release_fence(self, name: str, migration_id: str) -> VmInfo:
        with self._lock:
            meta = self._meta(name)
            info = info_of(meta)
            stopped = self._stopped.pop(name, None)
            if not release_needed(info, migration_id):
                proc = self._proc(name)
                if stopped is not None and stopped[0] == migration_id and proc is not None \
                        and info.state is VmState.RUNNING:
                    # stopped by stop_for_fence, its fence never written: as it was
                    try:
                        proc.qmp.execute("cont")
                    except QMPError as exc:
                        raise VmError(f"VM {name!r}: QMP cont failed: {exc}") from exc
                return info
            self.throttle(name, 0)
            proc = self._proc(name)
            if proc is None:
                raise VmError(f"VM {name!r}: its QEMU is gone while fenced; it cannot resume "
                              "as it was (start it again to boot it)")
            # Durable first: a crash right after leaves meta RUNNING and the QEMU paused,
            # which the next backend resumes (_attach_all).
            meta.update(state=VmState.RUNNING.value, migration_id="")
            write_meta(self._dir(name), meta)
            try:
                proc.qmp.execute("cont")  # from paused or postmigrate: exactly as it was
            except QMPError as exc:
                raise VmError(f"VM {name!r}: QMP cont failed: {exc}") from exc
            return info_of(meta)

    def retire(self, name: str, migration_id: str) -> VmInfo:
        with self._lock:
            meta = self._meta(name)
            info = info_of(meta)
            if not retire_needed(info, migration_id):
                return info
            # A crash right after this write leaves a paused QEMU of a RETIRED VM, which
            # the next backend powers off (_attach_all): it can never run here again.
            meta["state"] = VmState.RETIRED.value
            write_meta(self._dir(name), meta)
            self._power_off(name)
            self._seal_now(name, meta)  # QEMU is off: the retained copy can be sealed
            return info_of(meta)

    def stop(self, name: str) -> VmInfo:
        """Power a running guest off (``dwcp vm stop``): STOPPED; its next start boots."""
        with self._lock:
            meta = self._meta(name)
            info = info_of(meta)
            if info.state is VmState.FENCED:
                raise FencedError(f"VM {name!r} is fenced by migration {info.migration_id!r}")
            if info.state not in (VmState.RUNNING, VmState.STOPPED):
                raise VmError(f"VM {name!r} is {info.state.value}; only a running VM stops")
            self._power_off(name)
            # A crash right before this write leaves RUNNING with no QEMU: the next start
            # boots it, as after this write.
            meta.update(state=VmState.STOPPED.value)
            write_meta(self._dir(name), meta)
            return info_of(meta)

    def remove(self, name: str) -> bool:
        with self._lock:
            self._power_off(check_vm_name(name))
            gone = remove_vm_dir(self.root, name)
            ram = self.ram_path(name).parent
            if ram.exists():
                shutil.rmtree(ram)
                gone = True
            return gone

    def close(self, stop_guests: bool = False) -> None:
        """Let go of every QEMU (they keep running), or power them all off."""
        with self._lock:
            for name in sorted(self._throttles):
                self._throttles.pop(name).stop()
            for name in sorted(self._procs):
                proc = self._procs.pop(name)
                if stop_guests:
                    proc.quit()
                else:
                    proc.qmp.close()
