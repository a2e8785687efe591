"""Carrying out a migration's VM actions on a :class:`~federation.vms.backend.VmBackend`:
the one interpreter of them, used by a node and by the simulator alike.

The session (:mod:`federation.migration.vocabulary`) says *what* happens to the VM, and
the rounds core (:mod:`federation.migration.rounds`) which pages a round reads and
writes (its page actions, :data:`federation.migration.round_events.PAGE_ACTIONS`); this
module does it and answers with their events. The session's actions block (fsync,
hashing every page for a root), so a node runs them in a worker thread
(``trio.to_thread.run_sync``); a page action copies at most one chunk between an image
and a message. The simulator calls :meth:`VmActions.carry_out` directly on its
simulated backend and schedules the replies after the time the work would take.

Roots: a VM's root is :func:`federation.vms.backend.combined_root` over the HDE root
(:func:`mesh.hde.index.build_index`) of each image, so the source's root at
the fence and the target's recomputed root are the same function of the bytes.

Every action is idempotent, as :mod:`federation.migration.restore` needs: a
fence of a fenced VM, a release of a VM that was never fenced, a retire of a
retired copy, a start with the epoch it already runs at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

from federation.migration.round_events import (
    ChunkRead,
    ChunkWritten,
    CloseRound,
    CountDirty,
    DirtyCounted,
    PlanRound,
    ReadChunk,
    RoundIoFailed,
    RoundPlanned,
    WriteChunk,
)
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
from federation.vms.sealed_image import SealedWriter
from mesh.hde.image import Image, ImageError, ImageWriter, PageSource
from mesh.hde.index import build_index

__all__ = ["VmActions", "images_root", "VM_ACTIONS", "VmAction", "PageAction", "PageReply"]

VM_ACTIONS = (Fence, Unfence, Retire, PrepareIncoming, Verify, StartAtTarget, DiscardIncoming)
VmAction = Fence | Unfence | Retire | PrepareIncoming | Verify | StartAtTarget | DiscardIncoming
_Reply = SourceFenced | TargetVerified | ActionFailed
PageAction = PlanRound | ReadChunk | WriteChunk | CountDirty | CloseRound
PageReply = RoundPlanned | ChunkRead | ChunkWritten | DirtyCounted | RoundIoFailed
#: What a page action meets when the images under it are gone: a closed mapping raises
#: ValueError (the migration ended while a chunk was on its way).
_PAGE_ERRORS = (VmError, ImageError, OSError, ValueError)


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
        #: migration id -> the images its running round reads (source)
        self.outgoing: dict[str, dict[str, Image]] = {}

    def root(self, vm: str) -> bytes:
        images = self.backend.open_images(vm)
        try:
            return images_root(images, self.executor)
        finally:
            for img in images.values():
                img.close()

    def carry_out(self, action: VmAction) -> list[_Reply]:
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

    def _close_outgoing(self, migration_id: str) -> None:
        for img in self.outgoing.pop(migration_id, {}).values():
            img.close()

    # ------------------------------------------------------------------ page actions

    def carry_out_pages(self, action: PageAction) -> list[PageReply]:
        """Do a page action of the rounds core; its reply (a write the target cannot do is
        refused in :class:`ChunkWritten`, any other failure is :class:`RoundIoFailed`)."""
        if isinstance(action, WriteChunk):
            return [ChunkWritten(action.peer, action.migration_id, action.round, action.seq,
                                 len(action.data), self._write(action))]
        if isinstance(action, CloseRound):
            self._close_outgoing(action.migration_id)
            return []
        try:
            return [self._pages(action)]
        except _PAGE_ERRORS as exc:
            return [RoundIoFailed(action.migration_id, action.round, str(exc))]

    def _pages(self, a: PlanRound | ReadChunk | CountDirty) -> PageReply:
        b = self.backend
        if isinstance(a, PlanRound):
            mark = b.dirty_mark(a.vm)  # before reading: a later write shows in the next round
            pages: dict[str, Sequence[int]]
            if a.since is None:
                pages = {name: range(count) for name, count in b.info(a.vm).layout}
            else:
                pages = dict(b.dirty_since(a.vm, a.since))
            self._close_outgoing(a.migration_id)
            self.outgoing[a.migration_id] = b.open_images(a.vm)
            return RoundPlanned(a.migration_id, a.round, mark,
                                tuple((n, tuple(pages[n])) for n in sorted(pages)))
        if isinstance(a, ReadChunk):
            images = self.outgoing.get(a.migration_id)
            if images is None or a.image not in images:
                raise VmError(f"migration {a.migration_id!r}: image {a.image!r} is not open "
                              "for its round")
            return ChunkRead(a.migration_id, a.round, a.seq,
                             bytes(images[a.image].view(a.first, a.count)))
        self._close_outgoing(a.migration_id)
        dirty = b.dirty_since(a.vm, a.mark)
        return DirtyCounted(a.migration_id, a.round, sum(len(p) for p in dirty.values()))

    def _write(self, a: WriteChunk) -> str:
        """Write a chunk into the incoming images; "" or why it was refused."""
        writers = self.incoming.get(a.migration_id)
        if writers is None:
            return f"migration {a.migration_id!r}: no incoming images"
        img = writers.get(a.image)
        if img is None:
            return f"no incoming image {a.image!r}"
        try:
            img.write(a.page, a.data)
        except (ImageError, ValueError) as exc:
            return str(exc)
        return ""

    def _do(self, a: VmAction) -> list[_Reply]:
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
            for w in writers.values():
                if isinstance(w, SealedWriter):
                    # Its writes since the last publish are not in the file yet: publish
                    # them before the root goes out, since the ledger commits on it and
                    # the source then retires its copy (a crash after this leaves the
                    # verified copy; before it, the old file and a root that will not
                    # match).
                    w.flush()
            return [TargetVerified(images_root(writers, self.executor))]
        if isinstance(a, StartAtTarget):
            self._close_incoming(a.migration_id)
            b.start(a.vm, a.epoch)
            return []
        self._close_incoming(a.migration_id)
        b.discard_incoming(a.vm, a.migration_id)
        return []
