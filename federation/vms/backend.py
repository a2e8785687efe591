"""VM backends: the one interface the migration driver uses to touch a VM.

A backend holds the VMs of one DC. A VM is a set of page-addressable images —
``memory`` (guest RAM) and ``disk-0``, ``disk-1``, ... — that the data plane
reads and writes through :mod:`mesh.hde.image` views: an ``mmap`` of a file,
so an image of hundreds of GiB is never read into memory.

Life cycle of a VM at one DC, as the migration protocol needs it::

    import/prepare_incoming --> STOPPED/INCOMING --start(epoch)--> RUNNING
    RUNNING --fence(migration)--> FENCED --release_fence(migration)--> RUNNING
    FENCED --retire(migration)--> RETIRED  (the target owns it now; files stay as a store)

- ``start`` carries the ledger epoch; an epoch older than the one the VM last
  ran with is refused (:class:`StaleEpochError`), so a DC that missed a
  migration can never run an outdated copy.
- ``fence`` stops the VM and records which migration fenced it; a fenced VM
  refuses ``start`` until ``release_fence`` names that migration, which the
  driver calls only once the ledger recorded its abort (DESIGN.md, "The ledger
  and a migration").
- Dirty tracking is generational, like QEMU's dirty bitmap sync: ``dirty_mark``
  opens a new generation and returns its number; ``dirty_since(mark)`` is the
  set of pages written in that generation or later. Pre-copy round k sends
  ``dirty_since(mark taken when round k-1 started)``.

- A VM may carry more than its images: ``machine_spec`` is what a target needs to run it
  (the qemu backend's VM spec), handed to the target's ``prepare_incoming``;
  ``device_state`` is the fenced VM's device state (QEMU's migration stream without RAM),
  handed to the target's ``start``. Both are ``b""`` for the image backend.

The ``image`` backend (:mod:`federation.vms.image_backend`) keeps VMs as files and a page
writer; the ``qemu`` backend (:mod:`federation.vms.qemu_backend`) runs each VM in its own
QEMU process over QMP.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import attrs

from mesh.hde.image import PAGE_SIZE, Image, ImageWriter

__all__ = [
    "VmError",
    "StaleEpochError",
    "FencedError",
    "VmState",
    "VmInfo",
    "DirtySet",
    "VmBackend",
    "MEMORY",
    "DEVICE",
    "disk_name",
    "check_vm_name",
    "check_image_name",
    "combined_root",
]

MEMORY = "memory"
#: The image a VM's device state travels in, where a backend has one beyond its images
#: (the qemu backend: QEMU's migration stream without RAM, saved into it at the fence), so
#: the final round carries it and the migration's root covers it like every other byte.
DEVICE = "device"
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IMAGE_NAME = re.compile(r"^(memory|device|disk-(0|[1-9][0-9]{0,3}))$")


class VmError(Exception):
    """A VM operation that cannot be done; the message names the VM and why."""


class StaleEpochError(VmError):
    """A start with an epoch older than the one the VM last ran with."""


class FencedError(VmError):
    """A start of a VM that a migration fenced and the ledger has not aborted."""


class VmState(enum.Enum):
    STOPPED = "stopped"  # imported, never started here
    INCOMING = "incoming"  # a migration target's copy under construction
    RUNNING = "running"
    FENCED = "fenced"  # stopped by a migration; resumes only after a ledger abort
    RETIRED = "retired"  # migrated away; the files remain as a dedup store


@attrs.frozen
class VmInfo:
    name: str
    epoch: int
    state: VmState
    #: image name -> page count, in order (memory first, then disks by number)
    layout: tuple[tuple[str, int], ...]
    #: the migration that fenced the VM (or is bringing it in), else ""
    migration_id: str = ""
    page_size: int = PAGE_SIZE

    @property
    def total_pages(self) -> int:
        return sum(n for _, n in self.layout)


#: image name -> sorted page numbers
DirtySet = Mapping[str, Sequence[int]]


def disk_name(i: int) -> str:
    return f"disk-{i}"


def check_vm_name(name: str) -> str:
    """A VM name is a path component: 1-128 of letters, digits, ``_.-``, not starting with
    a dot or dash (so it can never be ``..`` or an option)."""
    if not isinstance(name, str) or not _VM_NAME.match(name):
        raise VmError(
            f"VM name {name!r} must be 1-128 of A-Z a-z 0-9 _ . - (not starting with . or -)"
        )
    return name


def check_image_name(name: str) -> str:
    if not isinstance(name, str) or not _IMAGE_NAME.match(name):
        raise VmError(f"image name {name!r} is not 'memory', 'device' or 'disk-N'")
    return name


def combined_root(roots: Mapping[str, bytes]) -> bytes:
    """The one root the ledger records for a VM: SHA-256 over its images' HDE roots,
    in image-name order, each with its name, so no image can stand in for another."""
    h = hashlib.sha256(b"dwcp-vm-root\x00")
    for name in sorted(roots):
        raw = name.encode()
        h.update(len(raw).to_bytes(2, "big") + raw + roots[name])
    return h.digest()


class VmBackend(Protocol):
    """What the migration driver and the node need from a hypervisor (see module doc)."""

    def list_vms(self) -> list[VmInfo]:
        """Every VM this DC holds, in name order."""
        ...

    def info(self, name: str) -> VmInfo:
        """Raises :class:`VmError` for an unknown VM."""
        ...

    def import_vm(
        self, name: str, memory: Path, disks: Sequence[Path] = (), epoch: int = 0
    ) -> VmInfo:
        """Copy the files in as a new STOPPED VM (page-multiple sizes only)."""
        ...

    def open_images(self, name: str) -> dict[str, Image]:
        """Read-only page views of every image, keyed by image name (caller closes)."""
        ...

    def machine_spec(self, name: str) -> bytes:
        """What a target needs besides the images to run the VM (``b""``: nothing)."""
        ...

    def prepare_incoming(
        self, name: str, layout: Sequence[tuple[str, int]], migration_id: str,
        machine: bytes = b"",
    ) -> dict[str, ImageWriter]:
        """Writable images of ``layout`` for a migration target. An older copy of the VM
        (RETIRED or a previous INCOMING) is reused in place, so it serves as the diff base.
        ``machine`` is the source's :meth:`machine_spec`."""
        ...

    def discard_incoming(self, name: str, migration_id: str) -> None:
        """The migration aborted: the incoming copy goes back to RETIRED (kept as a store)."""
        ...

    def dirty_mark(self, name: str) -> int:
        """Open a new dirty-tracking generation; returns its number."""
        ...

    def dirty_since(self, name: str, mark: int) -> dict[str, list[int]]:
        """Pages written since generation ``mark`` opened, per image, sorted."""
        ...

    def start(self, name: str, epoch: int, device_state: bytes = b"") -> VmInfo:
        """Run the VM with ledger epoch ``epoch``. Raises :class:`StaleEpochError` for an
        epoch below the VM's, :class:`FencedError` while fenced. An INCOMING VM resumes
        from ``device_state``, the source's :meth:`device_state` (``b""``: none)."""
        ...

    def fence(self, name: str, migration_id: str) -> VmInfo:
        """Stop the VM for ``migration_id`` and make the stop durable. Idempotent for the
        same migration; a VM fenced by another migration raises :class:`FencedError`."""
        ...

    def device_state(self, name: str, migration_id: str) -> bytes:
        """The device state of the VM ``migration_id`` fenced, for the target's ``start``
        (``b""``: the VM has none beyond its images). Idempotent: the same bytes again."""
        ...

    def release_fence(self, name: str, migration_id: str) -> VmInfo:
        """The ledger aborted ``migration_id``: lift its fence and run the VM again. A VM
        this migration never fenced is left as it is (idempotent)."""
        ...

    def retire(self, name: str, migration_id: str) -> VmInfo:
        """The ledger committed ``migration_id``: this copy will never run again here
        (until a later migration brings the VM back with a higher epoch)."""
        ...

    def remove(self, name: str) -> bool:
        """The ledger deleted the VM (or its import was never registered): stop it and
        delete its files. Returns False if there was no such VM here (idempotent)."""
        ...

    def close(self) -> None:
        """The node stops: release what the backend holds (guest processes, mappings)."""
        ...
