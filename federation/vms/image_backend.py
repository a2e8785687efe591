"""The ``image`` VM backend: a VM is a directory of page images and its metadata.

::

    ROOT/NAME/meta.json     {"name", "epoch", "state", "page_size", "layout", "migration_id"}
                            -- replaced atomically (temp + fsync + rename + dir fsync)
    ROOT/NAME/memory.img    guest RAM, a whole number of 4 KiB pages
    ROOT/NAME/disk-N.img    disks

Every directory is created 0700 and every file 0600 (a VM's images are its guest's
memory and disks: nobody else on the machine reads them).

**At rest.** Given the node's at-rest key (``seal_key``), every image is a sealed file
(:mod:`federation.vms.sealing`): imports are sealed as they are copied in, a migration
target writes through a :class:`~federation.vms.sealed_image.SealedWriter` (published
atomically), and reads decrypt a chunk at a time, so a stolen data directory reveals no
page. Plain images found at start (a data directory from before the key) are sealed
then. Without a key (the demo's page writer, some tests) images are plain, mapped
files, as before.

**Retention.** A RETIRED VM is a retained copy (:mod:`federation.vms.retention`); with a
budget (``retain_bytes``) the least recently used copies beyond it are removed whenever
a copy is retired or discarded, and at start. :meth:`ImageBackend.purge` removes one on
an operator's request, or a staged import that was never registered.

"Running" means the DC owns the VM. Images are only ever mapped (``mmap``), never read
whole. The backend has no guest of its own: whatever writes a VM's pages in this
process reports each write with :meth:`ImageBackend.note_write`, which is its dirty
tracking (the demo's page writer, :mod:`federation.demo.guest_backend`, does).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federation.vms.backend import (
    MEMORY,
    VmError,
    VmInfo,
    VmState,
    check_image_name,
    check_vm_name,
    disk_name,
)
from federation.vms.retention import VmUsage, dir_bytes, evictions
from federation.vms.sealed_image import (
    WORK_SUFFIX,
    SealedImage,
    SealedWriter,
    is_sealed,
    seal_file,
)
from federation.vms.sealing import SealError, SealKey
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

__all__ = ["ImageBackend", "atomic_write", "MappedImage", "map_writable"]

class MappedImage(ImageWriter):
    """A writable image over a shared file mapping, which :meth:`flush` makes durable."""

    def __init__(self, mapping: mmap.mmap, name: str) -> None:
        super().__init__(mapping, name)
        self._mapping = mapping

    def flush(self) -> None:
        self._mapping.flush()
        if self._wfd is not None:  # what went through the descriptor (ImageWriter)
            os.fdatasync(self._wfd)


def map_writable(path: Path, page_count: int, name: str) -> MappedImage:
    """Map ``path`` writable at exactly ``page_count`` pages, keeping what it holds (a file
    that grows gets sparse zero pages). Never reads the file into memory."""
    with open(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+b") as f:
        if os.fstat(f.fileno()).st_size != page_count * PAGE_SIZE:
            f.truncate(page_count * PAGE_SIZE)
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
        img = MappedImage(m, name)
        img._wfd = os.dup(f.fileno())  # writes go through it: a full disk is ENOSPC, not SIGBUS
    return img


class ImageBackend:
    """VMs as directories under ``root`` (implements :class:`federation.vms.backend.VmBackend`)."""

    def __init__(self, root: Path | str, seal_key: SealKey | None = None,
                 retain_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.seal_key = seal_key
        #: the retained copies' budget in bytes (None: no budget)
        self.retain_bytes = retain_bytes
        self._lock = threading.Lock()  # guards _generation and _dirty
        #: held while VM directories are created, removed or change state (a purge never
        #: removes a copy that a migration is about to reuse)
        self._files = threading.RLock()
        self._generation: dict[str, int] = {}
        self._dirty: dict[str, dict[tuple[str, int], int]] = {}
        #: retained copies removed: (count, bytes), by why ("budget", "purge")
        self.purged: dict[str, tuple[int, int]] = {}
        self._clean_leftovers()
        if seal_key is not None:
            self._seal_plain_images()
        self.enforce_retention()

    # ------------------------------------------------------------------ files at rest

    def _clean_leftovers(self) -> None:
        """Remove what a crash can leave: an import's staging directory, a purge under
        way, a writer's unpublished work copy, a file half sealed (none of them was ever
        the VM's published state)."""
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(".") and d.name.endswith((".importing", ".purging")):
                shutil.rmtree(d, ignore_errors=True)
            elif d.is_dir():
                for f in d.iterdir():
                    if f.name.endswith((".img" + WORK_SUFFIX, ".sealing", ".tmp")):
                        f.unlink(missing_ok=True)

    def _seal_plain_images(self) -> None:
        """Seal every plain image under the root (a data directory from before the key):
        each into a new sealed file renamed over the plain one."""
        assert self.seal_key is not None
        for info in self._readable():
            for img, _ in info.layout:
                path = self._dir(info.name) / f"{img}.img"
                if path.exists() and not is_sealed(path):
                    tmp = path.with_name(path.name + ".tmp")
                    seal_file(path, tmp, self.seal_key)
                    os.replace(tmp, path)
                    fsync_dir(path.parent)

    def _open(self, path: Path, name: str) -> Image:
        if self.seal_key is None:
            return open_image(path, name)
        try:
            return SealedImage(path, self.seal_key, name)
        except SealError as exc:
            raise VmError(str(exc)) from None

    def _writable(self, path: Path, count: int, name: str) -> ImageWriter:
        if self.seal_key is None:
            return map_writable(path, count, name)
        try:
            return SealedWriter(path, self.seal_key, count, name)
        except SealError as exc:
            raise VmError(str(exc)) from None

    # ------------------------------------------------------------------ retention

    def _readable(self) -> list[VmInfo]:
        """Every VM whose meta.json reads (one that does not is left alone: it is listed
        with its error where VMs are listed, and never removed or counted)."""
        out = []
        for d in sorted(self.root.iterdir()):
            if not d.name.startswith(".") and d.is_dir() and (d / META).exists():
                try:
                    out.append(self.info(d.name))
                except VmError:
                    continue
        return out

    def usage(self) -> list[VmUsage]:
        """Every VM's bytes on disk here, in name order."""
        out = []
        for info in self._readable():
            d = self._dir(info.name)
            try:
                at = float(self._read_meta(info.name).get("retired_at", 0.0))
            except (VmError, TypeError, ValueError):
                at = 0.0
            out.append(VmUsage(info.name, info.state, dir_bytes(d), at))
        return out

    def enforce_retention(self) -> list[str]:
        """Remove the least recently used retained copies beyond the budget; their names."""
        if self.retain_bytes is None:
            return []
        with self._files:
            gone = evictions(self.usage(), self.retain_bytes)
            for name in gone:
                self._remove(name, "budget")
        return gone

    def purge(self, name: str, staged: bool = False) -> int:
        """Remove the retained copy ``name`` (a RETIRED VM), or with ``staged`` a STOPPED
        VM (an import that was never registered); the bytes freed. Any other state is
        refused: a VM that runs, is fenced or is arriving here is not a copy to drop."""
        with self._files:
            info = self.info(name)
            allowed = (VmState.RETIRED, VmState.STOPPED) if staged else (VmState.RETIRED,)
            if info.state not in allowed:
                what = "retained (migrated away)" + (" or staged" if staged else "")
                raise VmError(f"VM {name!r} is {info.state.value} here, not {what}; only a "
                              "retained copy is purged")
            return self._remove(name, "purge" if info.state is VmState.RETIRED else "staged")

    def _remove(self, name: str, why: str) -> int:
        """Rename the VM's directory aside, then delete it: a crash in between leaves a
        hidden leftover that the next start removes, never half a VM."""
        d = self._dir(name)
        size = dir_bytes(d)
        gone = self.root / f".{name}.purging"
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(d, gone)
        fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)
        with self._lock:
            self._generation.pop(name, None)
            self._dirty.pop(name, None)
        count, total = self.purged.get(why, (0, 0))
        self.purged[why] = (count + 1, total + size)
        return size

    # ------------------------------------------------------------------ metadata

    def _dir(self, name: str) -> Path:
        return self.root / check_vm_name(name)

    def _read_meta(self, name: str) -> dict[str, Any]:
        return read_meta(self._dir(name), name)

    def _write_meta(self, name: str, meta: dict[str, Any]) -> None:
        write_meta(self._dir(name), meta)

    _info = staticmethod(info_of)

    @staticmethod
    def _new_meta(name: str, layout: Sequence[tuple[str, int]], state: VmState,
                  epoch: int, migration_id: str = "") -> dict[str, Any]:
        return new_meta(name, layout, state, epoch, migration_id)

    # ------------------------------------------------------------------ queries

    def list_vms(self) -> list[VmInfo]:
        """Every VM here. An import's staging directory (``.NAME.importing``, which holds
        its meta.json for an instant before it is renamed into place) and a purge's are
        not VMs: a dot never starts a VM name. Listing one raised and stopped the node
        when a ledger change's reconcile ran beside concurrent imports (dwcp bench fleet)."""
        out = []
        for d in sorted(self.root.iterdir()):
            if not d.name.startswith(".") and d.is_dir() and (d / META).exists():
                out.append(self.info(d.name))
        return out

    def info(self, name: str) -> VmInfo:
        return self._info(self._read_meta(name))

    def path(self, name: str) -> Path:
        return self._dir(name)

    def open_images(self, name: str) -> dict[str, Image]:
        info = self.info(name)
        out: dict[str, Image] = {}
        try:
            for img, _ in info.layout:
                out[img] = self._open(self._dir(name) / f"{img}.img", f"{name}/{img}")
        except BaseException:
            for opened in out.values():
                opened.close()
            raise
        return out

    # ------------------------------------------------------------------ creating VMs

    def import_vm(self, name: str, memory: Path, disks: Sequence[Path] = (),
                  epoch: int = 0) -> VmInfo:
        final = self._dir(name)
        if final.exists():
            raise VmError(f"VM {name!r} already exists in {self.root}")
        sources = [(MEMORY, Path(memory))] + [(disk_name(i), Path(d)) for i, d in enumerate(disks)]
        layout = []
        for img, src in sources:
            try:
                size = src.stat().st_size
            except OSError as exc:
                raise VmError(f"VM {name!r}: {img} file {src}: {exc}") from exc
            if size == 0 or size % PAGE_SIZE:
                raise VmError(f"VM {name!r}: {img} file {src} is {size} bytes, "
                              f"not a positive multiple of {PAGE_SIZE}")
            layout.append((img, size // PAGE_SIZE))
        staging = self.root / f".{name}.importing"
        with self._files:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=DIR_MODE)
            try:
                for img, src in sources:
                    self._copy_in(src, staging / f"{img}.img")
                meta = self._new_meta(name, layout, VmState.STOPPED, epoch)
                atomic_write(staging / META, json.dumps(meta, sort_keys=True).encode() + b"\n")
                os.replace(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)  # a failed import leaves nothing
                raise
            fsync_dir(self.root)
        return self._info(meta)

    def _copy_in(self, src: Path, dst: Path) -> None:
        """One image of an import: sealed as it is read, or copied plain without a key."""
        if self.seal_key is not None:
            try:
                seal_file(src, dst, self.seal_key)  # 16 MiB at a time, fsynced, 0600
            except ImageError as exc:
                raise VmError(str(exc)) from None
            return
        shutil.copyfile(src, dst)  # copy_file_range/sendfile: never the whole file in memory
        os.chmod(dst, FILE_MODE)  # (inside the 0700 staging directory meanwhile)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())

    def machine_spec(self, name: str) -> bytes:
        self.info(name)  # an unknown VM is an error here too
        return b""  # an image VM is its images

    def device_state(self, name: str, migration_id: str) -> bytes:
        info = self.info(name)
        if info.state is not VmState.FENCED or info.migration_id != migration_id:
            raise VmError(f"VM {name!r} is not fenced by migration {migration_id!r}")
        return b""  # the page writer's state is in the images and its log

    def prepare_incoming(self, name: str, layout: Sequence[tuple[str, int]],
                         migration_id: str, machine: bytes = b"") -> dict[str, ImageWriter]:
        with self._files:
            return self._prepare_incoming(name, layout, migration_id, machine)

    def _prepare_incoming(self, name: str, layout: Sequence[tuple[str, int]],
                          migration_id: str, machine: bytes) -> dict[str, ImageWriter]:
        if machine:
            raise VmError(f"VM {name!r}: the image backend runs no machine spec "
                          f"({len(machine)} bytes came from a different backend)")
        for img, count in layout:
            check_image_name(img)
            if count <= 0:
                raise VmError(f"VM {name!r}: image {img} needs a positive page count")
        d = self._dir(name)
        if (d / META).exists():
            meta = self._read_meta(name)
            state = self._info(meta).state
            if state not in (VmState.RETIRED, VmState.INCOMING):
                raise VmError(f"VM {name!r} is {state.value} here; cannot receive it")
            meta.update(state=VmState.INCOMING.value, migration_id=migration_id,
                        layout=[[n, c] for n, c in layout])
        else:
            d.mkdir(mode=DIR_MODE)
            meta = self._new_meta(name, layout, VmState.INCOMING, 0, migration_id)
        writers: dict[str, ImageWriter] = {}
        try:
            for img, count in layout:
                writers[img] = self._writable(d / f"{img}.img", count, f"{name}/{img}")
        except BaseException:
            for w in writers.values():
                w.close()
            raise
        self._write_meta(name, meta)
        return writers

    def discard_incoming(self, name: str, migration_id: str) -> None:
        if not (self._dir(name) / META).exists():
            return  # the copy was never prepared: nothing to discard
        meta = self._read_meta(name)
        if meta["state"] == VmState.RETIRED.value:
            return
        if meta["state"] != VmState.INCOMING.value or meta["migration_id"] != migration_id:
            raise VmError(f"VM {name!r} is not incoming for migration {migration_id!r}")
        meta.update(state=VmState.RETIRED.value, retired_at=time.time())
        self._write_meta(name, meta)
        self.enforce_retention()

    # ------------------------------------------------------------------ dirty tracking

    def dirty_mark(self, name: str) -> int:
        with self._lock:
            gen = self._generation.get(name, 0) + 1
            self._generation[name] = gen
            return gen

    def dirty_since(self, name: str, mark: int) -> dict[str, list[int]]:
        with self._lock:
            pages = [k for k, g in self._dirty.get(name, {}).items() if g >= mark]
        out: dict[str, list[int]] = {}
        for img, page in sorted(pages):
            out.setdefault(img, []).append(page)
        return out

    def note_write(self, name: str, image: str, page: int) -> None:
        """Called by a writer *after* the page holds its new bytes, so a round that took
        its mark before this call re-sends the page in the next round."""
        with self._lock:
            self._dirty.setdefault(name, {})[(image, page)] = self._generation.get(name, 0)

    # ------------------------------------------------------------------ running

    def start(self, name: str, epoch: int, device_state: bytes = b"") -> VmInfo:
        if device_state:
            raise VmError(f"VM {name!r}: the image backend has no device state to load "
                          f"({len(device_state)} bytes came from a different backend)")
        meta = self._read_meta(name)
        check_start(self._info(meta), epoch)
        meta.update(state=VmState.RUNNING.value, epoch=epoch, migration_id="")
        self._write_meta(name, meta)
        return self._info(meta)

    def fence(self, name: str, migration_id: str) -> VmInfo:
        meta = self._read_meta(name)
        info = self._info(meta)
        if not fence_needed(info, migration_id):
            return info
        meta.update(state=VmState.FENCED.value, migration_id=migration_id)
        self._write_meta(name, meta)
        return self._info(meta)

    def release_fence(self, name: str, migration_id: str) -> VmInfo:
        meta = self._read_meta(name)
        info = self._info(meta)
        if not release_needed(info, migration_id):
            return info  # nothing of this migration to lift (it aborted before the fence)
        meta.update(state=VmState.RUNNING.value, migration_id="")
        self._write_meta(name, meta)
        return self._info(meta)

    def retire(self, name: str, migration_id: str) -> VmInfo:
        meta = self._read_meta(name)
        info = self._info(meta)
        if not retire_needed(info, migration_id):
            return info
        meta.update(state=VmState.RETIRED.value, retired_at=time.time())
        self._write_meta(name, meta)
        self.enforce_retention()
        return self._info(meta)

    def remove(self, name: str) -> bool:
        with self._lock:
            self._generation.pop(name, None)
            self._dirty.pop(name, None)
        return remove_vm_dir(self.root, check_vm_name(name))

    def close(self) -> None:
        """Nothing to release: every image this backend hands out is the caller's to close,
        and it keeps no file open between calls."""
