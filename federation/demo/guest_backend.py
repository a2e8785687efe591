"""The ``image`` backend with the demo's page writer as the guest of its VMs: a demo and
test tool, not part of the production node (``dwcp node`` runs the plain
:class:`~federation.vms.image_backend.ImageBackend`; the HTTP API imports VMs, it never
attaches a writer).

A VM with a writer (:meth:`WritingBackend.attach_writer`, or named in the ``writers``
the backend was made with) has its pages dirtied by a
:class:`~federation.demo.guest_writer.WriterThread` while it runs here: the writer starts
when the VM starts or its fence is lifted, and :meth:`~WritingBackend.fence` stops it —
every write applied, logged and flushed — before the fence is recorded, so the images
at the fence are exactly what the writer last wrote. Each write is reported to the image
backend's dirty tracking (:meth:`~federation.vms.image_backend.ImageBackend.note_write`).

::

    ROOT/NAME/writer.json   {"seed", "rate"}: the VM's writer, resumed after a restart
    ROOT/NAME/writer.log    what the writer wrote (see :mod:`federation.demo.guest_writer`)

``dwcp demo`` runs its source DC's node with this backend
(:mod:`federation.demo.writer_node`); in-process tests build nodes with it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from federation.demo.guest_writer import PageWriter, WriterThread
from federation.vms.backend import VmError, VmInfo, VmState
from federation.vms.image_backend import ImageBackend, atomic_write, map_writable
from mesh.hde.image import ImageError, ImageWriter

__all__ = ["WritingBackend", "WriterSetting", "WRITER_FILE", "WRITER_LOG"]

WRITER_FILE = "writer.json"
WRITER_LOG = "writer.log"


@attrs.frozen
class WriterSetting:
    """A writer dirtying ``rate`` pages per second with content derived from ``seed``."""

    seed: int
    rate: float

    def __attrs_post_init__(self) -> None:
        if not self.rate > 0:
            raise VmError(f"writer rate must be positive, got {self.rate}")


class WritingBackend(ImageBackend):
    """See the module docstring. ``writers`` (VM name -> setting) are attached to those VMs
    when they first start here."""

    def __init__(self, root: Path | str,
                 writers: Mapping[str, WriterSetting] | None = None) -> None:
        super().__init__(root)
        self._configured = dict(writers or {})
        self._threads: dict[str, WriterThread] = {}
        #: VM name -> why its writer stopped on its own
        self.writer_errors: dict[str, str] = {}

    # ------------------------------------------------------------------ the writer

    def attach_writer(self, name: str, seed: int, rate: float) -> None:
        """Dirty ``rate`` pages per second with content derived from ``seed`` while the VM
        runs here (also after a restart: the setting is in ``writer.json``). Replacing the
        setting atomically means a crash leaves the old setting or the new one."""
        setting = WriterSetting(seed, rate)
        info = self.info(name)
        atomic_write(self.path(name) / WRITER_FILE,
                     json.dumps(attrs.asdict(setting), sort_keys=True).encode() + b"\n")
        self._stop_writer(name)
        if info.state is VmState.RUNNING:
            self._resume_writer(name)

    def detach_writer(self, name: str) -> None:
        """Stop the VM's writer and forget it (removing ``writer.json``; a crash before the
        removal leaves the writer attached, to be detached again)."""
        self._stop_writer(name)
        (self.path(name) / WRITER_FILE).unlink(missing_ok=True)

    def writer(self, name: str) -> WriterThread | None:
        return self._threads.get(name)

    def _setting(self, name: str) -> WriterSetting | None:
        path = self.path(name) / WRITER_FILE
        try:
            doc = json.loads(path.read_bytes())
            return WriterSetting(int(doc["seed"]), float(doc["rate"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VmError(f"VM {name!r}: unreadable {path}: {exc}") from None

    def _resume_writer(self, name: str) -> None:
        if name in self._threads:
            return
        setting = self._setting(name)
        if setting is None:
            return
        d = self.path(name)
        images = {img: map_writable(d / f"{img}.img", count, f"{name}/{img}")
                  for img, count in self.info(name).layout}
        try:
            writer = PageWriter(images, d / WRITER_LOG, setting.seed,
                                on_write=lambda img, page: self.note_write(name, img, page))
        except (ImageError, OSError, ValueError) as exc:
            raise VmError(f"VM {name!r}: cannot start its writer: {exc}") from exc
        thread = WriterThread(writer, setting.rate)
        self._threads[name] = thread
        thread.start()

    def _stop_writer(self, name: str) -> None:
        thread = self._threads.pop(name, None)
        if thread is None:
            return
        try:
            thread.stop()
        except RuntimeError as exc:
            # The workload died on its own (a full disk under its log, say): the VM is
            # stopped either way, and a fence must still succeed. Kept for the operator.
            self.writer_errors[name] = str(exc)

    # ------------------------------------------------------------------ the life cycle

    def remove(self, name: str) -> bool:
        self._stop_writer(name)
        return super().remove(name)

    def start(self, name: str, epoch: int, device_state: bytes = b"") -> VmInfo:
        info = super().start(name, epoch, device_state)
        configured = self._configured.get(name)
        if configured is not None and self._setting(name) is None:
            self.attach_writer(name, configured.seed, configured.rate)
        self._resume_writer(name)
        return info

    def release_fence(self, name: str, migration_id: str) -> VmInfo:
        info = super().release_fence(name, migration_id)
        if info.state is VmState.RUNNING:
            self._resume_writer(name)
        return info

    def fence(self, name: str, migration_id: str) -> VmInfo:
        if self.info(name).state in (VmState.RUNNING, VmState.STOPPED):
            self._stop_writer(name)  # every write is on disk and logged before the fence is
        return super().fence(name, migration_id)

    def prepare_incoming(self, name: str, layout: Sequence[tuple[str, int]],
                         migration_id: str, machine: bytes = b"") -> dict[str, ImageWriter]:
        """An older copy reused in place loses its writer first: its setting is removed and
        its log set aside (they describe content the migration replaces), then the copy
        becomes incoming. A crash in between leaves a retired copy without a writer, which
        it never runs anyway; never an incoming copy that would resume the old writer."""
        d = self.path(name)
        try:
            reused = self.info(name).state in (VmState.RETIRED, VmState.INCOMING)
        except VmError:
            reused = False  # no copy here (or none the backend can read: it refuses below)
        if reused:
            (d / WRITER_FILE).unlink(missing_ok=True)
            log = d / WRITER_LOG
            if log.exists():
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", migration_id)  # one path component
                os.replace(log, d / f"{WRITER_LOG}.before-{safe}")
        return super().prepare_incoming(name, layout, migration_id, machine)

    def close(self) -> None:
        for name in sorted(self._threads):
            self._stop_writer(name)
