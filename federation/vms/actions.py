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

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

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
    LoadDevice,
    PrepareIncoming,
    Retire,
    SourceFenced,
    StartAtTarget,
    TargetVerified,
    Throttle,
    Throttled,
    Unfence,
    Verify,
)
from federation.vms.backend import DEVICE, VmBackend, VmError, VmState, combined_root
from federation.vms.dirty_scan import SentDigests
from federation.vms.per_vm import dirty_by_content
from federation.vms.roots import IncomingIndexes, LiveIndex
from federation.vms.sealed_image import SealedWriter
from mesh.hde.image import Image, ImageError, ImageWriter, PageSource
from mesh.hde.index import PageIndex, build_index

__all__ = ["VmActions", "images_root", "VM_ACTIONS", "VmAction", "PageAction", "PageReply"]

VM_ACTIONS = (Fence, Throttle, Unfence, Retire, PrepareIncoming, Verify, LoadDevice,
              StartAtTarget, DiscardIncoming)
VmAction = (Fence | Throttle | Unfence | Retire | PrepareIncoming | Verify | LoadDevice
            | StartAtTarget | DiscardIncoming)
_Reply = SourceFenced | TargetVerified | Throttled | ActionFailed
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
        #: migration id -> per image the digests of what its rounds read, for a VM whose
        #: dirty pages are found by content (dirty_by_content): what differs from them is
        #: what the target lacks (federation.vms.dirty_scan)
        self.read_digests: dict[str, dict[str, SentDigests]] = {}
        #: migration id -> per image the index of the live images kept current (a source
        #: whose VM is tracked by content): the fence's root without hashing all of RAM
        self.live_indexes: dict[str, dict[str, LiveIndex]] = {}
        #: migration id -> the target's indexes of its incoming images (federation.vms.roots)
        self.incoming_indexes: dict[str, IncomingIndexes] = {}
        #: migration id -> the throttle (percent) its session put on the source VM
        #: (auto-converge, federation.migration.precopy): lifted at an abort
        self.converging: dict[str, int] = {}
        #: migration id -> per image the index and group digests of its v3 shadow after
        #: round 1 (set by the node: the v3 data plane's ``shadow_digests``; None: none)
        self.shadow_digests: Callable[[str], dict[str, tuple[PageIndex, bytes]] | None] \
            | None = None
        #: seconds the phases of this thread's last VM action took (:attr:`timings`)
        self._timings = threading.local()
        #: migration id -> wall-clock times of a target's Verify (start, end): with the
        #: source's stop time and the start, the stop window the target reports
        self._verified_at: dict[str, tuple[float, float]] = {}
        #: migration id -> seconds a target's LoadDevice took (beside the ledger's commit)
        self._loaded_in: dict[str, float] = {}
        #: migrations whose live indexes were caught up after the fence's stop
        self._fenced_live: set[str] = set()

    @property
    def timings(self) -> dict[str, float]:
        """Seconds the phases of the last VM action took, of the calling thread's: the node
        carries out different VMs' actions on several threads at once and logs each with
        its own (the stop window of a migration, docs/qemu.md "Downtime")."""
        got: dict[str, float] | None = getattr(self._timings, "value", None)
        if got is None:
            got = self._timings.value = {}
        return got

    @timings.setter
    def timings(self, value: dict[str, float]) -> None:
        self._timings.value = value

    def incoming_index(self, migration_id: str, image: str) -> PageIndex:
        """The current index of incoming image ``image`` of ``migration_id`` (refreshed over
        what was written since; the v3 receiver's per-round root and Verify share it)."""
        writers = self.incoming.get(migration_id)
        if writers is None or image not in writers:
            raise VmError(f"migration {migration_id!r}: no incoming image {image!r}")
        roots = self.incoming_indexes.setdefault(migration_id, IncomingIndexes(self.executor))
        return roots.index(image, writers[image])

    def fenced_indexes(self, migration_id: str) -> dict[str, PageIndex] | None:
        """The index of each image of a source VM fenced by ``migration_id``, caught up
        after its ``stop`` (copies), or None: the final round's shadow holds the same bytes
        once refreshed, so it needs no index of its own (one SHA-256 pass over the changed
        blocks less in the downtime)."""
        held = self.live_indexes.get(migration_id)
        if held is None or migration_id not in self._fenced_live:
            return None
        return {n: li.index.copy() for n, li in held.items()}

    def _fenced_root(self, vm: str, migration_id: str,
                     device_saved: Callable[[], object] = lambda: None) -> bytes:
        """The root of the fenced VM: caught up from the live index over what changed since
        the last round (the VM is stopped: exact), else hashed whole. ``device_saved``
        returns once the device image holds the device state (saved meanwhile on another
        thread): the other images are caught up before it is awaited."""
        held = self.live_indexes.get(migration_id)
        images = self.backend.open_images(vm)
        try:
            if held is None or set(held) != set(images):
                device_saved()
                return images_root(images, self.executor)
            for name in sorted(images, key=lambda n: n == DEVICE):  # the device image last
                if name == DEVICE:
                    device_saved()
                held[name].catch_up(images[name], self.executor, stopped=True)  # no copies
            device_saved()  # a layout without a device image: still wait for the save
            self._fenced_live.add(migration_id)
            return combined_root({n: held[n].index.root for n in images})
        finally:
            for img in images.values():
                img.close()

    def _fence(self, a: Fence) -> bytes:
        """Stop the VM; its root. The device state (a backend that saves one apart from the
        stop: the qemu backend's QEMU migration stream) is saved on its own thread while
        the RAM and disks are caught up, since neither touches the other's bytes; the
        timings say what each took (the source's share of the stop window)."""
        b = self.backend
        self.converging.pop(a.migration_id, None)  # the fence ends any throttle
        stop = getattr(b, "stop_for_fence", None)
        t0 = time.monotonic()
        if not callable(stop):
            b.fence(a.vm, a.migration_id)
            t1 = time.monotonic()
            root = self._fenced_root(a.vm, a.migration_id)
            self.timings = {"stop_and_device_s": t1 - t0, "root_s": time.monotonic() - t1}
            return root
        # qemu: QMP stop; the fence is made durable by the fence below, on the saver's
        # thread, before this action answers (nothing of it leaves the node before)
        stop(a.vm, a.migration_id, durable=False)
        t1 = time.monotonic()
        device: list[float] = []

        def save() -> None:
            b.fence(a.vm, a.migration_id)  # stopped already: the fence's write, the device
            device.append(time.monotonic() - t1)  # state

        with ThreadPoolExecutor(1, thread_name_prefix="device-state") as saver:
            saving = saver.submit(save)
            try:
                root = self._fenced_root(a.vm, a.migration_id, saving.result)
            finally:
                saving.cancel()  # (the pool's exit waits for a save under way)
        self.timings = {"stop_s": t1 - t0, "device_s": device[0] if device else 0.0,
                        "root_s": time.monotonic() - t1}
        return root

    def _live_from_shadow(self, vm: str, migration_id: str) -> dict[str, LiveIndex] | None:
        """The live indexes of a VM whose round 1 left a shadow (the v3 data plane's
        ``shadow_digests``: its index and group digests), so the first catch-up is one
        grouped scan of RAM and a re-index of what changed since the copy, instead of a
        scan for the count and a copy and index of all of RAM; None where there is none."""
        shadow = self.shadow_digests(migration_id) if self.shadow_digests else None
        if shadow is None:
            return None
        images = self.backend.open_images(vm)
        try:
            if set(shadow) != set(images) or any(
                    shadow[n][0].page_count != img.page_count for n, img in images.items()):
                return None
        finally:
            for img in images.values():
                img.close()
        held = {n: LiveIndex.of(index, groups) for n, (index, groups) in shadow.items()}
        self.live_indexes[migration_id] = held
        return held

    def _count_dirty(self, vm: str, migration_id: str, mark: int) -> int:
        """Pages written while the round ran: for a VM tracked by content, what changed
        since the live index last caught up (which it does now; built at the first round's
        end, in pre-copy), else the backend's generation."""
        b = self.backend
        if not dirty_by_content(b, vm):
            return sum(len(p) for p in b.dirty_since(vm, mark).values())
        if b.info(vm).state is VmState.FENCED:
            return 0  # the final round's end: a stopped guest writes nothing (no scan)
        held = self.live_indexes.get(migration_id)
        if held is None:
            held = self._live_from_shadow(vm, migration_id)
        if held is None:
            count = sum(len(p) for p in b.dirty_since(vm, mark).values())
            images = b.open_images(vm)
            try:
                self.live_indexes[migration_id] = {n: LiveIndex(img)
                                                   for n, img in images.items()}
            finally:
                for img in images.values():
                    img.close()
            return count
        images = b.open_images(vm)
        try:
            count = sum(held[n].catch_up(img, self.executor) for n, img in images.items()
                        if n in held)
        finally:
            for img in images.values():
                img.close()
        return count

    def _throttle(self, a: Throttle) -> Throttled:
        """Put the session's throttle on the VM where the backend can (a qemu guest); what
        it applied. Never a failure: a VM that cannot be throttled is migrated anyway."""
        throttle = getattr(self.backend, "throttle", None)
        if not callable(throttle):
            return Throttled(0)
        try:
            throttle(a.vm, a.percent)
        except (VmError, OSError):
            self.converging.pop(a.migration_id, None)
            return Throttled(0)
        throttled = getattr(self.backend, "throttled", None)
        applied = int(throttled(a.vm)) if callable(throttled) else a.percent
        if applied:
            self.converging[a.migration_id] = applied
        else:
            self.converging.pop(a.migration_id, None)
        self.timings = {"throttle_percent": float(applied)}
        return Throttled(applied)

    def _end_converge(self, vm: str, migration_id: str) -> None:
        current = self.converging.pop(migration_id, 0)
        throttle = getattr(self.backend, "throttle", None)
        if current and callable(throttle):
            throttle(vm, 0)

    def _note_arrival(self, vm: str, migration_id: str, start: float) -> None:
        """The stop window of an arrived guest, phase by phase, where the backend measured
        its downtime (qemu: the source's stop time travels in the device image): until this
        node's Verify began (the source's fence and final round, this node's apply), the
        Verify, until the start (the ledger's commit; the device state's load runs beside
        it, ``device_load_ms``), the start (cont, and the device state if not loaded)."""
        note = getattr(self.backend, "note_arrival", None)
        verified = self._verified_at.pop(migration_id, None)
        loaded = self._loaded_in.pop(migration_id, None)
        if not callable(note) or verified is None:
            return

        def window(stopped_at: float, cont_at: float) -> dict[str, float]:
            out = {"fence_and_final_round_ms": round((verified[0] - stopped_at) * 1000, 1),
                   "verify_ms": round((verified[1] - verified[0]) * 1000, 1),
                   "commit_ms": round((start - verified[1]) * 1000, 1),
                   "start_ms": round((cont_at - start) * 1000, 1)}
            if loaded is not None:
                out["device_load_ms"] = round(loaded * 1000, 1)
            return out

        note(vm, migration_id, window)

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
        self.incoming_indexes.pop(migration_id, None)
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
            content = dirty_by_content(b, a.vm)
            # before reading: a later write shows in the next round (a VM tracked by content
            # compares with what was read instead, after its first round: no scan here)
            mark = a.since if content and a.since is not None else b.dirty_mark(a.vm)
            pages: dict[str, Sequence[int]]
            self._close_outgoing(a.migration_id)
            live = self.outgoing[a.migration_id] = b.open_images(a.vm)
            held = self.read_digests.get(a.migration_id)
            if a.since is None:
                pages = {name: range(count) for name, count in b.info(a.vm).layout}
                if content:
                    self.read_digests[a.migration_id] = {
                        n: SentDigests(img) for n, img in live.items()}
            elif held is not None and set(held) == set(live):
                pages = {n: got for n in sorted(held) if (got := held[n].changed(live[n]))}
            else:
                pages = dict(b.dirty_since(a.vm, a.since))
            return RoundPlanned(a.migration_id, a.round, mark,
                                tuple((n, tuple(pages[n])) for n in sorted(pages)))
        if isinstance(a, ReadChunk):
            opened = self.outgoing.get(a.migration_id)
            if opened is None or a.image not in opened:
                raise VmError(f"migration {a.migration_id!r}: image {a.image!r} is not open "
                              "for its round")
            data = bytes(opened[a.image].view(a.first, a.count))
            digests = self.read_digests.get(a.migration_id, {}).get(a.image)
            if digests is not None:
                digests.read(a.first, data)
            return ChunkRead(a.migration_id, a.round, a.seq, data)
        self._close_outgoing(a.migration_id)
        return DirtyCounted(a.migration_id, a.round,
                            self._count_dirty(a.vm, a.migration_id, a.mark))

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
        self.timings = {}
        if isinstance(a, Throttle):
            return [self._throttle(a)]
        if isinstance(a, Fence):
            root = self._fence(a)
            self.timings["rehashed_blocks"] = float(sum(
                li.rehashed for li in self.live_indexes.get(a.migration_id, {}).values()))
            return [SourceFenced(root)]
        if isinstance(a, Unfence):
            self.read_digests.pop(a.migration_id, None)
            self.live_indexes.pop(a.migration_id, None)
            self._fenced_live.discard(a.migration_id)
            self._end_converge(a.vm, a.migration_id)  # aborted before its fence
            b.release_fence(a.vm, a.migration_id)
            return []
        if isinstance(a, Retire):
            self._end_converge(a.vm, a.migration_id)  # committed before its fence
            self.read_digests.pop(a.migration_id, None)
            self.live_indexes.pop(a.migration_id, None)
            self._fenced_live.discard(a.migration_id)
            b.retire(a.vm, a.migration_id)
            return []
        if isinstance(a, PrepareIncoming):
            self._close_incoming(a.migration_id)
            self.incoming[a.migration_id] = b.prepare_incoming(a.vm, a.layout, a.migration_id,
                                                               a.machine)
            # A hypervisor's process starts now, paused, not in the downtime (the qemu
            # backend: QEMU with -incoming defer on the images being written)
            prepare_machine = getattr(b, "prepare_machine", None)
            if a.machine and prepare_machine is not None:
                prepare_machine(a.vm)
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
            roots = self.incoming_indexes.setdefault(a.migration_id,
                                                     IncomingIndexes(self.executor))
            started = time.time()
            root = roots.root(writers)
            self._verified_at[a.migration_id] = (started, time.time())
            self.timings = {"verify_s": time.time() - started}
            return [TargetVerified(root)]
        if isinstance(a, LoadDevice):
            # a hypervisor's device state into its waiting process while the ledger commits
            # (the qemu backend: migrate-incoming; the guest stays paused until the start)
            load = getattr(b, "load_device", None)
            if callable(load):
                started = time.time()
                load(a.vm, a.migration_id)
                self._loaded_in[a.migration_id] = time.time() - started
                self.timings = {"load_s": self._loaded_in[a.migration_id]}
            return []
        if isinstance(a, StartAtTarget):
            # Plain mappings of the incoming images are let go after the start: unmapping
            # 256 MiB of guest RAM this node wrote took 50 ms in a lone process at load 15
            # (bench live's targets began the start 200-390 ms after the commit under load,
            # with this first), in the downtime. A sealed writer publishes when closed, so
            # it is closed before, as always.
            late = not any(isinstance(w, SealedWriter)
                           for w in self.incoming.get(a.migration_id, {}).values())
            if not late:
                self._close_incoming(a.migration_id)
            started = time.time()
            try:
                b.start(a.vm, a.epoch)
                ran = time.time()
            finally:
                if late:
                    self._close_incoming(a.migration_id)
            closed = time.time()
            self._note_arrival(a.vm, a.migration_id, started)
            # after the start: the mappings let go, the arrival's phases written
            self.timings = {"start_s": ran - started, "close_s": closed - ran,
                            "note_s": time.time() - closed}
            return []
        self._close_incoming(a.migration_id)
        self._verified_at.pop(a.migration_id, None)
        self._loaded_in.pop(a.migration_id, None)
        b.discard_incoming(a.vm, a.migration_id)
        return []
