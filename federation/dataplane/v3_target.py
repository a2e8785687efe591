"""The target side of the v3 data plane (see :mod:`federation.dataplane.v3_protocol`): the
AMST server on the node's data endpoint, and per round one HDE target per image writing the
incoming images, each image's root recomputed and checked before the source hears it is done.

The rounds core (:mod:`federation.migration.round_target`) decides whether a round is
taken — from the migration's source, once the incoming images are prepared — and says
:class:`~federation.migration.round_events.V3Accept`; this driver checks the images,
opens the page store, registers the round's AMST transfer and reports
:class:`~federation.migration.round_events.V3Accepted` (the core answers the source).
It reports every chunk that lands, every image verified and a round that cannot go on
(the core counts them, keeps the session's stall timer quiet, tells the source)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import trio

from federation.dataplane.v3_protocol import peek_chunk
from federation.dataplane.v3_push import (
    PUSH_FLAG,
    PushTarget,
    V3Held,
    V3PushOffer,
    is_push,
    push_transfer,
)
from federation.migration.round_events import (
    V3Accept,
    V3Accepted,
    V3ChunkLanded,
    V3ImageVerified,
    V3ReceiveFailed,
)
from federation.migration.round_messages import V3Hde
from federation.vms.backend import VmBackend, VmError, VmState
from mesh import versions, wire
from mesh.channel import SecureChannel
from mesh.core import Notify, Received, Send
from mesh.hde.events import ChunkArrived, RecomputeRoot, RootRecomputed
from mesh.hde.image import PAGE_SIZE, Image, ImageError, ImageWriter
from mesh.hde.index import PageIndex, build_index
from mesh.hde.store import PageStore
from mesh.hde.target import HdeTarget
from mesh.runtime.amst_transfer import AmstServer
from mesh.runtime.log import JsonLog

__all__ = ["V3Receiver"]

#: Diff messages of one round waiting for its HDE targets: the source has at most
#: mesh.hde.target.WINDOW requests' answers plus its wants in flight per image.
_INBOX = 4096


class _Store:
    """A migration's page store at the target and the read-only images it opened."""

    def __init__(self) -> None:
        self.pages = PageStore()
        self.opened: list[Image] = []

    def close(self) -> None:
        for img in self.opened:
            img.close()
        self.opened = []


class _Round:
    def __init__(self, receiver: V3Receiver, accept: V3Accept, writers: list[ImageWriter],
                 store: _Store) -> None:
        self.receiver = receiver
        self.peer = accept.peer
        self.mid = accept.migration_id
        self.round = accept.round
        self.vm = accept.vm
        self.names = accept.images
        self.writers = writers
        self.store = store
        self.targets = [
            HdeTarget(i + 1, self.peer, store.pages, self._sink(w)) for i, w in enumerate(writers)
        ]
        self.locks = [trio.Lock() for _ in writers]
        #: image -> its push core, for the images the source pushes this round
        self.pushes: dict[int, PushTarget] = {}
        self.indexes: list[PageIndex | None] = [None] * len(writers)
        self.failed = ""
        self.inbox_send, self.inbox = trio.open_memory_channel[V3Hde](_INBOX)

    @staticmethod
    def _sink(writer: ImageWriter) -> Callable[[int], ImageWriter]:
        return lambda page_count: writer  # HdeTarget checks the page count itself

    async def consume(self) -> None:
        async for msg in self.inbox:
            if msg.image >= len(self.targets):
                self.fail(f"diff message for image {msg.image} of {len(self.targets)}")
                return
            try:
                inner = wire.decode(msg.body)
            except wire.WireError as exc:
                self.fail(f"bad HDE message: {exc}")
                return
            await self.step(msg.image, Received(self.peer, inner, msg.body))

    async def chunk(self, chunk: int, payload: bytes) -> None:
        """AMST sink: a verified chunk frame (or a feed's end marker)."""
        ids = peek_chunk(payload)
        if ids is None or not 1 <= ids[0] & ~PUSH_FLAG <= len(self.targets):
            return
        self.receiver.report(V3ChunkLanded(self.mid, self.round, len(payload)))
        await self.step((ids[0] & ~PUSH_FLAG) - 1, ChunkArrived(ids[0], ids[1], payload))

    async def _push_target(self, i: int) -> PushTarget:
        """Image ``i``'s push core (federation.dataplane.v3_push), made at its first pushed
        message or chunk, before anything of this round is written: the root the image
        holds is what the source's base must be."""
        held = self.pushes.get(i)
        if held is None:
            ix = await trio.to_thread.run_sync(self.receiver.index_of, self.mid, self.names[i])
            held = self.pushes[i] = PushTarget(i, self.peer, self.writers[i], ix.root)
        return held

    async def step(self, i: int, event: Any) -> None:
        """Feed ``event`` to image ``i``'s HDE target, or its push core for a pushed image
        (in a worker thread: decoding and checking chunks is CPU work), and carry out its
        actions. The incoming image gone (the migration ended here meanwhile: a message
        of the peer's arriving after an abort) or not writable (a full disk) fails the
        round; it never ends the node (found by ``make netns-chaos``: a late message
        after an abort raised VmError "no incoming image" out of the node's nursery)."""
        try:
            await self._step(i, event)
        except (OSError, VmError, ImageError) as exc:
            self.fail(f"image {self.names[i]}: {exc}")

    async def _step(self, i: int, event: Any) -> None:
        async with self.locks[i]:
            pushed = (isinstance(event, ChunkArrived) and is_push(event.transfer)) or (
                isinstance(event, Received) and isinstance(event.message, V3PushOffer))
            target: HdeTarget | PushTarget = (await self._push_target(i) if pushed
                                              else self.targets[i])
            events: deque[Any] = deque([event])
            while events:
                acts: list[Any] = await trio.to_thread.run_sync(
                    target.handle, trio.current_time(), events.popleft())
                for a in acts:
                    if isinstance(a, Send):
                        body = wire.encode(a.message)
                        self.receiver.send(self.peer, V3Hde(self.mid, self.round, i, body))
                    elif isinstance(a, RecomputeRoot):
                        # refreshed over what this migration wrote since (federation.vms.roots)
                        ix = await trio.to_thread.run_sync(self.receiver.index_of, self.mid,
                                                           self.names[i])
                        self.indexes[i] = ix
                        events.append(RootRecomputed(a.transfer, bytes(ix.levels[0]), ix.root))
                    elif isinstance(a, Notify) and a.kind == "hde.verified":
                        await self._verified(i, target)
                    elif isinstance(a, Notify) and a.kind == "hde.failed":
                        self.fail(f"image {self.names[i]}: {a.detail['reason']}")

    async def _verified(self, i: int, target: HdeTarget | PushTarget) -> None:
        """The image's root matched: it is the base of the next round and serves dedup."""
        ix = self.indexes[i]
        assert ix is not None, "HDE verifies only after the root was recomputed"
        await trio.to_thread.run_sync(self.store.pages.add, f"{self.vm}/{self.names[i]}",
                                      self.writers[i], ix)
        wanted = target.stats["pages_wanted"]
        self.receiver.report(V3ImageVerified(self.mid, self.round, wanted * PAGE_SIZE))
        self.receiver.log.event("v3_image_verified", migration_id=self.mid, round=self.round,
                                image=self.names[i], **target.stats)

    def fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = reason
            self.receiver.log.event("v3_round_failed", migration_id=self.mid,
                                    round=self.round, error=reason)
            self.receiver.report(V3ReceiveFailed(self.peer, self.mid, self.round, reason))


class V3Receiver:
    """A node's v3 target side (see the module docstring). ``incoming(mid)`` gives a
    migration's prepared incoming images; ``report`` takes the driver's reports for the
    rounds core."""

    def __init__(
        self,
        *,
        backend: VmBackend,
        new_channel: Callable[[], SecureChannel],
        send: Callable[[str, Any], bool],
        incoming: Callable[[str], dict[str, ImageWriter] | None],
        report: Callable[[object], None],
        log: JsonLog,
        executor: Executor | None = None,
        index_of: Callable[[str, str], PageIndex] | None = None,
        peer_offer: Callable[[str], tuple[int, ...]] | None = None,
    ) -> None:
        self.backend = backend
        #: a peer's whole offer on its control link (what its migrations' sources read)
        self.peer_offer = peer_offer if peer_offer is not None else (lambda peer: ())
        #: (migration id, image) -> the incoming image's current index
        self.index_of = index_of if index_of is not None else self._build_index
        self.server = AmstServer(new_channel)
        self.send = send
        self.incoming = incoming
        self.report = report
        self.log = log
        self.executor = executor
        self.rounds: dict[tuple[str, int], _Round] = {}
        self.stores: dict[str, _Store] = {}
        self._transfers: dict[tuple[str, int], bytes] = {}
        self.nursery: trio.Nursery | None = None

    def on_diff(self, peer: str, msg: V3Hde) -> None:
        r = self.rounds.get((msg.migration_id, msg.round))
        if r is not None and r.peer == peer and not r.failed:
            try:
                r.inbox_send.send_nowait(msg)
            except trio.WouldBlock:
                r.fail("the diff inbox overflowed")

    def accept(self, accept: V3Accept) -> None:
        assert self.nursery is not None, "rounds arrive only while the node runs"
        self.nursery.start_soon(self._accept, accept)

    async def _accept(self, a: V3Accept) -> None:
        mid = a.migration_id
        writers = self.incoming(mid)
        if writers is None or set(a.images) != set(writers):
            self.report(V3Accepted(a.peer, mid, a.round, f"the incoming images of {mid!r} "
                                                         f"are not prepared as {list(a.images)}"))
            return
        store = self.stores.get(mid)
        held: list[V3Held] = []
        if store is None:
            try:
                store = await trio.to_thread.run_sync(self._new_store, a.vm, mid, writers)
            except (OSError, VmError, ImageError) as exc:  # ended meanwhile, or a full disk
                self.report(V3Accepted(a.peer, mid, a.round, f"the incoming images of "
                                                             f"{mid!r}: {exc}"))
                return
            self.stores[mid] = store
            if versions.COLD_PUSH in self.peer_offer(a.peer):
                held = self._held(store, a.vm, a.images)
        r = _Round(self, a, [writers[n] for n in a.images], store)
        for old in [k for k in self.rounds if k[0] == mid]:  # an earlier round is over
            self._drop(old)
        self.rounds[(mid, a.round)] = r
        self.server.expect(a.transfer, r.chunk)
        self._transfers[(mid, a.round)] = a.transfer
        assert self.nursery is not None
        self.nursery.start_soon(r.consume)
        # the migration's first round here: what each incoming image holds, before the
        # round's status (one link, in order), so the source knows at the round's go
        # whether it may stream it to a cold copy (v3_push.StreamSource)
        for i, msg in enumerate(held):
            self.send(a.peer, V3Hde(mid, a.round, i, wire.encode(msg)))
        self.report(V3Accepted(a.peer, mid, a.round))

    @staticmethod
    def _held(store: _Store, vm: str, images: tuple[str, ...]) -> list[V3Held]:
        """Per image of a round (in its order) the root its incoming copy holds: the index
        the new store was just filled with (nothing of the migration written since)."""
        out = []
        for i, name in enumerate(images):
            stored = store.pages.base(f"{vm}/{name}")
            assert stored is not None, "a new store holds every incoming image"
            out.append(V3Held(push_transfer(i), stored.index.page_count, stored.index.root))
        return out

    def _build_index(self, mid: str, image: str) -> PageIndex:
        """An incoming image's index hashed whole (a receiver without a shared index)."""
        writers = self.incoming(mid)
        if writers is None or image not in writers:
            raise VmError(f"migration {mid!r}: no incoming image {image!r}")
        return build_index(writers[image], self.executor)

    def _new_store(self, vm: str, mid: str, writers: dict[str, ImageWriter]) -> _Store:
        """Worker thread: index every other VM held here and the copy of ``vm`` already in
        the incoming images (an earlier copy of it, or nothing), for dedup and as bases."""
        store = _Store()
        try:
            self._fill_store(store, vm, mid, writers)
        except BaseException:
            store.close()  # the images it opened so far
            raise
        return store

    def _fill_store(self, store: _Store, vm: str, mid: str,
                    writers: dict[str, ImageWriter]) -> None:
        for info in self.backend.list_vms():
            if info.name == vm or info.state is VmState.INCOMING:
                continue
            try:
                images = self.backend.open_images(info.name)
            except (OSError, VmError, ImageError) as exc:
                self.log.event("v3_store_skipped", vm=info.name, error=str(exc))
                continue
            for name, img in sorted(images.items()):
                store.opened.append(img)
                store.pages.add(f"{info.name}/{name}", img, build_index(img, self.executor))
        for name, w in sorted(writers.items()):
            store.pages.add(f"{vm}/{name}", w, self.index_of(mid, name))

    def _drop(self, key: tuple[str, int]) -> None:
        r = self.rounds.pop(key, None)
        if r is not None:
            r.inbox_send.close()
        tid = self._transfers.pop(key, None)
        if tid is not None:
            self.server.transfers.pop(tid, None)

    def finish(self, mid: str) -> None:
        """The migration ended here (committed, aborted or discarded): drop its state."""
        for key in [k for k in self.rounds if k[0] == mid]:
            self._drop(key)
        store = self.stores.pop(mid, None)
        if store is not None:
            store.close()
