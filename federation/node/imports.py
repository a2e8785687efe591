"""Importing a VM: where a node may read images from, and the copy before the register.

**Confinement.** A node reads VM images only under the directories its node config names
(``[storage] import_dirs``, :mod:`federation.node.node_config`). A path is taken only if
it is absolute, has no ``..`` component, and — with every symlink resolved — lies under
one of those directories; anything else is refused with the same message whether it
exists or not, so the API cannot be used to probe the node's file system. The file is
then opened component by component from the import directory with ``O_NOFOLLOW``, so
a symlink swapped in after the check (a race by a local user) is refused too, and only a
regular file is read; the copy reads that open file (``/proc/self/fd/N``), never the
path again.

**Staging, then the register.** An import is two operator requests. ``POST
/api/imports`` (checked at the API's door) copies the images into the node's store as a
*staged* VM, which may take as long as the images are large; ``POST /api/vms``, signed
once the copy is done, registers the staged VM in the ledger and runs it. The ledger
checks the register's freshness (300 s, consensus.authz.FRESHNESS_WINDOW) against a
request signed after the copy, so a long copy never expires a legitimate import, and
the ledger needs no longer window (nor a longer memory of nonces) for imports.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from federation.node.errors import NodeError
from federation.vms.backend import VmBackend, VmError, VmState, check_vm_name
from federation.vms.qemu_spec import VmSpec
from mesh.hde.image import PAGE_SIZE
from mesh.runtime.log import JsonLog

__all__ = ["ImportDirs", "ImportRefused", "Staged", "ImportStaging", "STAGED", "COPYING",
           "FAILED", "is_spec"]

COPYING, STAGED, FAILED = "copying", "staged", "failed"


class ImportRefused(NodeError):
    """A path the node will not read (outside its import directories, or not a file)."""


class ImportDirs:
    """The directories a node reads VM images from (each resolved once, at start)."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        resolved: list[str] = []
        for d in dirs:
            real = os.path.realpath(d)
            try:
                st = os.stat(real)
            except OSError as exc:
                raise NodeError(f"import directory {d}: {exc.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise NodeError(f"import directory {d}: not a directory")
            if st.st_mode & stat.S_IWOTH:
                raise NodeError(f"import directory {d}: writable by every user (mode "
                                f"{stat.S_IMODE(st.st_mode):o}); anyone could plant images "
                                "in it (chmod o-w)")
            resolved.append(real)
        self.dirs = tuple(sorted(set(resolved)))

    def __str__(self) -> str:
        return ", ".join(self.dirs) or "none configured"

    def _refuse(self, field: str, text: str) -> ImportRefused:
        return ImportRefused(f"{field}: {text!r} is not a file under this node's import "
                             f"directories ({self}; [storage] import_dirs of its node config)")

    def open(self, field: str, text: str, pages: bool = True) -> int:
        """A read-only descriptor of the regular file ``text`` names, or ImportRefused
        (``pages``: its size must be a positive multiple of the page size)."""
        if not os.path.isabs(text) or ".." in Path(text).parts or "\x00" in text:
            raise self._refuse(field, text)
        real = os.path.realpath(text)
        base = next((d for d in self.dirs
                     if real != d and os.path.commonpath([real, d]) == d), None)
        if base is None:
            raise self._refuse(field, text)
        parts = Path(os.path.relpath(real, base)).parts
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                flags |= os.O_NONBLOCK if last else os.O_DIRECTORY
                try:
                    nfd = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    raise ImportRefused(f"{field}: {text}: no such file") from None
                except OSError:  # a symlink swapped in (ELOOP), not a directory, no access
                    raise self._refuse(field, text) from None
                os.close(fd)
                fd = nfd
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise self._refuse(field, text)
        if pages and (st.st_size == 0 or st.st_size % PAGE_SIZE):
            os.close(fd)
            raise ImportRefused(f"{field}: {text} is {st.st_size} bytes, not a positive "
                                f"multiple of {PAGE_SIZE}")
        return fd


@attrs.define
class Staged:
    """One import's copy: ``state`` copying, staged or failed (``error`` says why)."""

    vm: str
    memory: str
    disks: tuple[str, ...]
    state: str = COPYING
    error: str = ""

    def doc(self) -> dict[str, object]:
        return {"vm": self.vm, "memory": self.memory, "disks": list(self.disks),
                "state": self.state, "error": self.error or None}


def is_spec(memory: str) -> bool:
    """An import whose ``memory`` names a TOML file creates a qemu VM from that spec
    (docs/qemu.md): the spec's kernel and initramfs are the node's own files, under its
    ``[qemu] guest_files``; its disks are the import's ``disks``."""
    return memory.endswith(".toml")


class ImportStaging:
    """The imports of one node: the copy into the backend as a STOPPED VM, confined to
    ``dirs``; the register that follows is the node's (:meth:`Node.import_vm`)."""

    def __init__(self, backend: VmBackend, dirs: ImportDirs, log: JsonLog) -> None:
        self.backend = backend
        self.dirs = dirs
        self.log = log
        self.copies: dict[str, Staged] = {}
        self._done: dict[str, trio.Event] = {}

    def _create(self, staged: Staged, spec_file: Path, disks: list[Path]) -> None:
        """Worker thread: a qemu VM from the spec in ``spec_file`` (its ``disks`` key is
        refused: a node copies only the disks the operator's request names)."""
        where = f"{staged.memory}"
        try:
            doc = tomllib.loads(spec_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise VmError(f"{where}: {exc}") from None
        if "disks" in doc:
            raise VmError(f"{where}.disks: at a node the disks are the request's own "
                          "(dwcp vm create --node sends the spec's disks as such)")
        spec = VmSpec.from_dict(doc, where)
        self.backend.create(staged.vm, spec, disks)  # type: ignore[attr-defined]

    async def changed(self, vm: str) -> None:
        """Until the copy of ``vm`` under way (if any) has ended."""
        done = self._done.get(vm)
        if done is not None:
            await done.wait()

    def status(self, vm: str) -> Staged | None:
        """The import of ``vm`` as far as this node knows (a staged copy survives a
        restart as a STOPPED VM of the backend)."""
        known = self.copies.get(vm)
        if known is not None:
            return known
        try:
            info = self.backend.info(vm)
        except VmError:
            return None
        return Staged(vm, "", (), STAGED) if info.state is VmState.STOPPED else None

    def begin(self, vm: str, memory: str, disks: Sequence[str]) -> tuple[Staged, list[int]]:
        """Check and open the files of a new import (raises ImportRefused/NodeError); the
        caller runs :meth:`copy` with the descriptors."""
        try:
            check_vm_name(vm)
        except VmError as exc:
            raise NodeError(str(exc)) from None
        known = self.status(vm)
        if known is not None and known.state != FAILED:
            raise NodeError(f"VM {vm!r} is already {known.state} here")
        try:
            self.backend.info(vm)
            raise NodeError(f"VM {vm!r} already exists here")
        except VmError:
            pass
        if is_spec(memory) and not callable(getattr(self.backend, "create", None)):
            raise NodeError(f"VM {vm!r}: {memory} is a qemu VM spec and this node runs no "
                            "qemu backend (a [qemu] table in its node config)")
        fds: list[int] = []
        try:
            fds.append(self.dirs.open("memory", memory, pages=not is_spec(memory)))
            for i, d in enumerate(disks):
                fds.append(self.dirs.open(f"disks[{i}]", d))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        staged = self.copies[vm] = Staged(vm, memory, tuple(disks))
        self._done[vm] = trio.Event()
        return staged, fds

    async def copy(self, staged: Staged, fds: list[int]) -> None:
        """Copy the opened files into the backend (a worker thread); the outcome is in
        ``staged``. The backend's import is itself atomic (a crash leaves no VM)."""
        paths = [Path(f"/proc/self/fd/{fd}") for fd in fds]
        try:
            if is_spec(staged.memory):
                await trio.to_thread.run_sync(self._create, staged, paths[0], paths[1:])
            else:
                await trio.to_thread.run_sync(self.backend.import_vm, staged.vm, paths[0],
                                              paths[1:])
        except (VmError, OSError) as exc:
            staged.state, staged.error = FAILED, str(exc)
            self.log.event("vm_import_failed", vm=staged.vm, error=str(exc))
        else:
            staged.state = STAGED
            self.log.event("vm_staged", vm=staged.vm, memory=staged.memory,
                           disks=list(staged.disks))
        finally:
            for fd in fds:
                os.close(fd)
            self._done.pop(staged.vm, trio.Event()).set()
