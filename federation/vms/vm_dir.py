"""What every file-based backend shares: a VM's ``meta.json`` and its life-cycle rules.

``ROOT/NAME/meta.json`` holds ``name``, ``epoch``, ``state``, ``page_size``, ``layout``,
``migration_id`` (plus backend-specific keys) and is replaced atomically. The rules of
:mod:`federation.vms.backend` (stale epochs, fences, retirement) are checked here once,
so the image and the qemu backend cannot drift apart on them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from federation.vms.backend import (
    FencedError,
    StaleEpochError,
    VmError,
    VmInfo,
    VmState,
    check_image_name,
)
from mesh.hde.image import PAGE_SIZE

__all__ = ["META", "DIR_MODE", "FILE_MODE", "atomic_write", "fsync_dir", "read_meta",
           "remove_vm_dir", "write_meta", "info_of", "new_meta", "check_start", "fence_needed",
           "release_needed", "retire_needed"]

META = "meta.json"
#: Modes of what a file-based backend creates: owner only (a VM's images are its guest's
#: memory and disks: nobody else on the machine reads them).
DIR_MODE, FILE_MODE = 0o700, 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never a
    mix: write a temp file, fsync it, rename over, fsync the directory (POSIX rename(2))."""
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_meta(directory: Path, name: str) -> dict[str, Any]:
    """The meta.json of VM ``name`` in ``directory``; :class:`VmError` names what is wrong."""
    path = directory / META
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise VmError(f"no VM {name!r} in {directory.parent}") from None
    except (OSError, ValueError) as exc:
        raise VmError(f"VM {name!r}: unreadable {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("name") != name:
        raise VmError(f"VM {name!r}: {path} does not describe this VM")
    return meta


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Atomically (:func:`atomic_write`): a crash leaves the old meta or the new one."""
    atomic_write(directory / META, json.dumps(meta, sort_keys=True).encode() + b"\n")


def info_of(meta: dict[str, Any]) -> VmInfo:
    try:
        layout = tuple((check_image_name(n), int(c)) for n, c in meta["layout"])
        return VmInfo(
            name=meta["name"],
            epoch=int(meta["epoch"]),
            state=VmState(meta["state"]),
            layout=layout,
            migration_id=str(meta.get("migration_id", "")),
            page_size=int(meta["page_size"]),
        )
    except (KeyError, TypeError, ValueError, VmError) as exc:
        raise VmError(f"VM {meta.get('name')!r}: bad meta.json: {exc}") from exc


def new_meta(name: str, layout: Sequence[tuple[str, int]], state: VmState, epoch: int,
             migration_id: str = "", **extra: Any) -> dict[str, Any]:
    return {"name": name, "epoch": epoch, "state": state.value, "page_size": PAGE_SIZE,
            "layout": [[n, c] for n, c in layout], "migration_id": migration_id, **extra}


def check_start(info: VmInfo, epoch: int) -> None:
    """Raise unless ``info``'s VM may start with ``epoch`` here (backend module doc)."""
    if info.state is VmState.FENCED:
        raise FencedError(f"VM {info.name!r} is fenced by migration {info.migration_id!r}; "
                          "it resumes only after the ledger aborts that migration")
    if info.state is VmState.RETIRED:
        raise VmError(f"VM {info.name!r} was migrated away ({info.migration_id!r}); "
                      "only a migration brings it back")
    if epoch < info.epoch:
        raise StaleEpochError(f"VM {info.name!r}: start with epoch {epoch}, "
                              f"but it last ran with epoch {info.epoch}")


def fence_needed(info: VmInfo, migration_id: str) -> bool:
    """False if ``migration_id`` already fenced the VM; raises if it cannot be fenced."""
    if info.state is VmState.FENCED:
        if info.migration_id != migration_id:
            raise FencedError(f"VM {info.name!r} is fenced by migration {info.migration_id!r}")
        return False
    if info.state not in (VmState.RUNNING, VmState.STOPPED):
        raise VmError(f"VM {info.name!r} is {info.state.value}; only a running VM is fenced")
    return True


def release_needed(info: VmInfo, migration_id: str) -> bool:
    """False if the VM is not fenced (the migration aborted before its fence); raises if
    another migration fenced it."""
    if info.state is not VmState.FENCED:
        return False
    if info.migration_id != migration_id:
        raise VmError(f"VM {info.name!r} is fenced by migration {info.migration_id!r}, "
                      f"not {migration_id!r}")
    return True


def retire_needed(info: VmInfo, migration_id: str) -> bool:
    """False if ``migration_id`` already retired the VM; raises unless it fenced it."""
    if info.state is VmState.RETIRED and info.migration_id == migration_id:
        return False
    if info.state is not VmState.FENCED or info.migration_id != migration_id:
        raise VmError(f"VM {info.name!r} is not fenced by migration {migration_id!r}")
    return True


def remove_vm_dir(root: Path, name: str) -> bool:
    """Delete the VM directory ``root/name``: renamed to ``.name.removing`` first (one
    atomic step, then the directory is synced), then deleted. A crash right after the
    rename leaves a dot-directory that no listing takes for a VM and that the next
    removal of the name deletes. False if there was none."""
    final = root / name
    doomed = root / f".{name}.removing"
    try:
        os.replace(final, doomed)
    except FileNotFoundError:
        shutil.rmtree(doomed, ignore_errors=True)
        return False
    fsync_dir(root)
    shutil.rmtree(doomed, ignore_errors=True)
    return True
