"""A node's VMs over two backends, chosen per VM: the ``image`` backend for imported image
files, the ``qemu`` backend for guests created from a spec (``dwcp vm create``) or that
arrive by migration with one (docs/qemu.md, "The node").

Each VM lives in exactly one of the two; every call about a VM goes to the backend that
holds it. A migration target chooses by what the source sent: a machine spec (the qemu
backend's VM spec) means qemu, none means images. A name held by one backend is refused
by the other, so a VM never has two copies on one node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from federation.vms.backend import VmBackend, VmError, VmInfo
from federation.vms.qemu_backend import QemuBackend
from federation.vms.qemu_spec import VmSpec
from mesh.hde.image import Image, ImageWriter

__all__ = ["PerVmBackend", "dirty_by_content"]


def dirty_by_content(backend: object, name: str) -> bool:
    """Does ``backend`` find VM ``name``'s dirty pages by comparing content (so a round
    must compare with what it sent, federation.vms.dirty_scan) rather than by write
    events? The qemu backend does; backends that say nothing track writes."""
    ask = getattr(backend, "dirty_by_content", None)
    return bool(ask(name)) if callable(ask) else False


class PerVmBackend:
    """Implements :class:`federation.vms.backend.VmBackend` over ``image`` and ``qemu``."""

    def __init__(self, image: VmBackend, qemu: QemuBackend) -> None:
        self.image = image
        self.qemu = qemu

    def _holds(self, backend: VmBackend, name: str) -> bool:
        try:
            backend.info(name)
        except VmError:
            return False
        return True

    def of(self, name: str) -> VmBackend:
        """The backend that holds ``name`` (the image backend answers for unknown VMs, and
        raises the VmError that says so)."""
        return self.qemu if self._holds(self.qemu, name) else self.image

    # ------------------------------------------------------------------ queries

    def list_vms(self) -> list[VmInfo]:
        return sorted([*self.image.list_vms(), *self.qemu.list_vms()], key=lambda i: i.name)

    def info(self, name: str) -> VmInfo:
        return self.of(name).info(name)

    def open_images(self, name: str) -> dict[str, Image]:
        return self.of(name).open_images(name)

    def machine_spec(self, name: str) -> bytes:
        return self.of(name).machine_spec(name)

    def dirty_by_content(self, name: str) -> bool:
        return self._holds(self.qemu, name)

    # ------------------------------------------------------------------ creating

    def import_vm(self, name: str, memory: Path, disks: Sequence[Path] = (),
                  epoch: int = 0) -> VmInfo:
        if self._holds(self.qemu, name):
            raise VmError(f"VM {name!r} already exists here (a qemu VM)")
        return self.image.import_vm(name, memory, disks, epoch)

    def create(self, name: str, spec: VmSpec, disks: Sequence[Path] = (),
               epoch: int = 0) -> VmInfo:
        """A new STOPPED qemu VM (:meth:`QemuBackend.create`)."""
        if self._holds(self.image, name):
            raise VmError(f"VM {name!r} already exists here (an image VM)")
        return self.qemu.create(name, spec, disks, epoch)

    def prepare_incoming(self, name: str, layout: Sequence[tuple[str, int]],
                         migration_id: str, machine: bytes = b"") -> dict[str, ImageWriter]:
        mine, other = (self.qemu, self.image) if machine else (self.image, self.qemu)
        if self._holds(other, name):
            kind = "an image" if machine else "a qemu"
            raise VmError(f"VM {name!r} is held here as {kind} VM; it cannot arrive as "
                          "another kind")
        return mine.prepare_incoming(name, layout, migration_id, machine)

    def prepare_machine(self, name: str) -> None:
        if self._holds(self.qemu, name):
            self.qemu.prepare_machine(name)

    def load_device(self, name: str, migration_id: str) -> None:
        """A qemu VM's device state into its waiting QEMU (:meth:`QemuBackend.load_device`);
        an image VM has none."""
        if self._holds(self.qemu, name):
            self.qemu.load_device(name, migration_id)

    def discard_incoming(self, name: str, migration_id: str) -> None:
        self.of(name).discard_incoming(name, migration_id)

    # ------------------------------------------------------------------ dirty tracking

    def dirty_mark(self, name: str) -> int:
        return self.of(name).dirty_mark(name)

    def dirty_since(self, name: str, mark: int) -> dict[str, list[int]]:
        return self.of(name).dirty_since(name, mark)

    # ------------------------------------------------------------------ running

    def start(self, name: str, epoch: int, device_state: bytes = b"") -> VmInfo:
        return self.of(name).start(name, epoch, device_state)

    def fence(self, name: str, migration_id: str) -> VmInfo:
        return self.of(name).fence(name, migration_id)

    def stop_for_fence(self, name: str, migration_id: str, durable: bool = True) -> VmInfo:
        """The fence's stop before its device state (:meth:`QemuBackend.stop_for_fence`);
        an image VM fences whole (it has no device state to save)."""
        if self._holds(self.qemu, name):
            return self.qemu.stop_for_fence(name, migration_id, durable)
        return self.image.fence(name, migration_id)

    def device_state(self, name: str, migration_id: str) -> bytes:
        return self.of(name).device_state(name, migration_id)

    def release_fence(self, name: str, migration_id: str) -> VmInfo:
        return self.of(name).release_fence(name, migration_id)

    def retire(self, name: str, migration_id: str) -> VmInfo:
        return self.of(name).retire(name, migration_id)

    def remove(self, name: str) -> bool:
        """The ledger deleted the VM: its copy here goes, whichever backend holds it."""
        return self.qemu.remove(name) if self._holds(self.qemu, name) \
            else self.image.remove(name)

    # the image backend's retained copies (the qemu backend keeps none beyond its VMs)
    def purge(self, name: str, staged: bool = False) -> int:
        purge = getattr(self.of(name), "purge", None)
        if not callable(purge):
            raise VmError(f"VM {name!r}: its backend keeps no retained copy to purge")
        return int(purge(name, staged=staged))

    @property
    def usage(self) -> Any:
        return getattr(self.image, "usage", None)

    @property
    def retain_bytes(self) -> int | None:
        return getattr(self.image, "retain_bytes", None)

    @property
    def purged(self) -> dict[str, tuple[int, int]]:
        return dict(getattr(self.image, "purged", {}))

    @property
    def seal_key(self) -> Any:
        return getattr(self.image, "seal_key", None)

    def stop(self, name: str) -> VmInfo:
        """Power a running qemu VM off (:meth:`QemuBackend.stop`)."""
        if not self._holds(self.qemu, name):
            self.image.info(name)  # an unknown VM says so
            raise VmError(f"VM {name!r} is an image VM; only a qemu VM powers off")
        return self.qemu.stop(name)

    def console_path(self, name: str) -> Path:
        if not self._holds(self.qemu, name):
            self.image.info(name)
            raise VmError(f"VM {name!r} is an image VM; it has no console")
        return self.qemu.console_path(name)

    def throttle(self, name: str, percent: int) -> None:
        """Auto-converge a qemu VM (:meth:`QemuBackend.throttle`); image VMs have no vCPU."""
        if self._holds(self.qemu, name):
            self.qemu.throttle(name, percent)

    def throttled(self, name: str) -> int:
        """The VM's throttle in percent (0: none, and always for an image VM)."""
        return self.qemu.throttled(name) if self._holds(self.qemu, name) else 0

    def arrival(self, name: str) -> dict[str, Any] | None:
        """How the qemu VM's last incoming migration ended (:meth:`QemuBackend.arrival`)."""
        return self.qemu.arrival(name) if self._holds(self.qemu, name) else None

    def note_arrival(self, name: str, migration_id: str,
                     window: Callable[[float, float], dict[str, float]]) -> None:
        """The stop window of a qemu VM's arrival (:meth:`QemuBackend.note_arrival`)."""
        if self._holds(self.qemu, name):
            self.qemu.note_arrival(name, migration_id, window)

    def close(self) -> None:
        try:
            self.image.close()
        finally:
            self.qemu.close()
