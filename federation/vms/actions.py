"""Carrying out a migration session's VM actions on a :class:`~federation.vms.backend.VmBackend`.

The session (:mod:`federation.migration.vocabulary`) says *what* happens to the VM; this
module does it and answers with the session's events. It blocks (fsync,
hashing every page for a root), so a node runs :meth:`VmActions.carry_out` in a
worker thread (``trio.to_thread.run_sync``); the simulator calls it directly
on its simulated backend, or models it.

Roots: a VM's root is :func:`federation.vms.backend.combined_root` over the HDE root
(:func:`mesh.hde.index.build_index`) of each image, so the source's root at
the fence and the target's recomputed root are the same function of the bytes.

Every action is idempotent, as :mod:`federation.migration.restore` needs: a
fence of a fenced VM, a release of a VM that was never fenced, a retire of a
retired copy, a start with the epoch it already runs at.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor

from federation.migration.vocabulary import (
    ActionFailed,
    DiscardIncoming,
    Fence,
    PrepareIncoming,
    Retire,
    SourceFenced,
    StartAtTarget,
    TargetVerified,
    Unfence,
    Verify,
)
from federation.vms.backend import VmBackend, VmError, combined_root
from mesh.hde.image import ImageError, ImageWriter, PageSource
from mesh.hde.index import build_index

__all__ = ["VmActions", "images_root", "VM_ACTIONS"]

VM_ACTIONS = (Fence, Unfence, Retire, PrepareIncoming, Verify, StartAtTarget, DiscardIncoming)
_VmAction = Fence | Unfence | Retire | PrepareIncoming | Verify | StartAtTarget | DiscardIncoming
_Reply = SourceFenced | TargetVerified | ActionFailed


def images_root(images: Mapping[str, PageSource], executor: Executor | None = None) -> bytes:
    """The VM root over ``images`` (name -> pages)."""
    return combined_root({n: build_index(img, executor).root for n, img in images.items()})


class VmActions:
    """Executes the VM actions of the sessions of one DC against ``backend``."""

    def __init__(self, backend: VmBackend, executor: Executor | None = None) -> None:
        self.backend = backend
        self.executor = executor
        #: migration id -> the writable incoming images the data plane writes into
        self.incoming: dict[str, dict[str, ImageWriter]] = {}

    def root(self, vm: str) -> bytes:
        images = self.backend.open_images(vm)
        try:
            return images_root(images, self.executor)
        finally:
            for img in images.values():
                img.close()

    def carry_out(self, action: _VmAction) -> list[_Reply]:
        """Do ``action``; the events to hand back to its session (a failure is reported
        as :class:`ActionFailed`, never raised)."""
        what = type(action).__name__
        try:
            return self._do(action)
        except (VmError, ImageError, OSError) as exc:
            return [ActionFailed(what, f"VM {action.vm!r}: {exc}")]

    def _close_incoming(self, migration_id: str) -> None:
        for img in self.incoming.pop(migration_id, {}).values():
            img.close()

    def _do(self, a: _VmAction) -> list[_Reply]:
        b = self.backend
        if isinstance(a, Fence):
            b.fence(a.vm, a.migration_id)
            return [SourceFenced(self.root(a.vm))]
        if isinstance(a, Unfence):
            b.release_fence(a.vm, a.migration_id)
            return []
        if isinstance(a, Retire):
            b.retire(a.vm, a.migration_id)
            return []
        if isinstance(a, PrepareIncoming):
            self._close_incoming(a.migration_id)
            self.incoming[a.migration_id] = b.prepare_incoming(a.vm, a.layout, a.migration_id)
            return []
        if isinstance(a, Verify):
            writers = self.incoming.get(a.migration_id)
            if writers is None:  # restarted since: the copy is on disk
                writers = b.prepare_incoming(a.vm, b.info(a.vm).layout, a.migration_id)
                self.incoming[a.migration_id] = writers
            return [TargetVerified(images_root(writers, self.executor))]
        if isinstance(a, StartAtTarget):
            self._close_incoming(a.migration_id)
            b.start(a.vm, a.epoch)
            return []
        self._close_incoming(a.migration_id)
        b.discard_incoming(a.vm, a.migration_id)
        return []
