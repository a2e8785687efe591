"""The target side of the v3 data plane (see :mod:`federation.dataplane.v3_protocol`): the
AMST server on the node's data endpoint, and per round one HDE target per image writing the incoming
images, each image's root recomputed and checked before the source hears it is done."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import trio

from federation.dataplane.v1 import ACK_TIMEOUT
from federation.dataplane.v3_protocol import V3Hde, V3Round, V3Status, peek_chunk
from federation.vms.backend import VmBackend, VmError, VmState
from mesh import wire
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
    def __init__(self, receiver: V3Receiver, peer: str, msg: V3Round, vm: str,
                 writers: list[ImageWriter], store: _Store) -> None:
        self.receiver = receiver
        self.peer = peer
        self.mid = msg.migration_id
        self.round = msg.round
        self.vm = vm
        self.names = msg.images
        self.writers = writers
        self.store = store
        self.targets = [
            HdeTarget(i + 1, peer, store.pages, self._sink(w)) for i, w in enumerate(writers)
        ]
        self.locks = [trio.Lock() for _ in writers]
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
        stats = self.receiver.stats
        if ids is None or not 1 <= ids[0] <= len(self.targets):
            return
        stats["chunks_received"] += 1
        stats["wire_bytes_received"] += len(payload)
        self.receiver.note_chunk(self.mid, self.round)
        await self.step(ids[0] - 1, ChunkArrived(ids[0], ids[1], payload))

    async def step(self, i: int, event: Any) -> None:
        """Feed ``event`` to image ``i``'s HDE target (in a worker thread: decoding and
        checking chunks is CPU work) and carry out its actions."""
        target = self.targets[i]
        async with self.locks[i]:
            events: deque[Any] = deque([event])
            while events:
                acts = await trio.to_thread.run_sync(target.handle, trio.current_time(),
                                                     events.popleft())
                for a in acts:
                    if isinstance(a, Send):
                        body = wire.encode(a.message)
                        self.receiver.send(self.peer, V3Hde(self.mid, self.round, i, body))
                    elif isinstance(a, RecomputeRoot):
                        ix = await trio.to_thread.run_sync(build_index, self.writers[i],
                                                           self.receiver.executor)
                        self.indexes[i] = ix
                        events.append(RootRecomputed(a.transfer, bytes(ix.levels[0]), ix.root))
                    elif isinstance(a, Notify) and a.kind == "hde.verified":
                        await self._verified(i, target)
                    elif isinstance(a, Notify) and a.kind == "hde.failed":
                        self.fail(f"image {self.names[i]}: {a.detail['reason']}")

    async def _verified(self, i: int, target: HdeTarget) -> None:
        """The image's root matched: it is the base of the next round and serves dedup."""
        ix = self.indexes[i]
        assert ix is not None, "HDE verifies only after the root was recomputed"
        await trio.to_thread.run_sync(self.store.pages.add, f"{self.vm}/{self.names[i]}",
                                      self.writers[i], ix)
        wanted = target.stats["pages_wanted"]
        self.receiver.note_pages(self.mid, self.round, wanted * PAGE_SIZE)
        self.receiver.log.event("v3_image_verified", migration_id=self.mid, round=self.round,
                                image=self.names[i], **target.stats)

    def fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = reason
            self.receiver.log.event("v3_round_failed", migration_id=self.mid,
                                    round=self.round, error=reason)
            self.receiver.send(self.peer, V3Status(self.mid, self.round, reason[:512]))


class V3Receiver:
    """A node's v3 target side. ``session_ok(mid, peer)`` says whether a migration from
    ``peer`` runs here as target; ``incoming(mid)`` gives its prepared incoming images;
    ``note_chunk(mid, round)`` hears of every chunk that arrived (the session's stall timer
    runs from the last one, so a long round, or one riding out a cut, is not a stall)."""

    def __init__(
        self,
        *,
        backend: VmBackend,
        new_channel: Callable[[], SecureChannel],
        send: Callable[[str, Any], bool],
        session_ok: Callable[[str, str], str | None],
        incoming: Callable[[str], dict[str, ImageWriter] | None],
        note_pages: Callable[[str, int, int], None],
        log: JsonLog,
        stats: dict[str, int],
        executor: Executor | None = None,
        note_chunk: Callable[[str, int], None] = lambda mid, round_: None,
    ) -> None:
        self.backend = backend
        self.server = AmstServer(new_channel)
        self.send = send
        self.session_ok = session_ok
        self.incoming = incoming
        self.note_pages = note_pages
        self.note_chunk = note_chunk
        self.log = log
        self.stats = stats
        self.executor = executor
        self.rounds: dict[tuple[str, int], _Round] = {}
        self.stores: dict[str, _Store] = {}
        self._prepared: dict[str, trio.Event] = {}
        self._transfers: dict[tuple[str, int], bytes] = {}
        self.nursery: trio.Nursery | None = None

    def prepared(self, mid: str) -> None:
        self._prepared.setdefault(mid, trio.Event()).set()

    def on_message(self, peer: str, msg: V3Round | V3Hde) -> None:
        if isinstance(msg, V3Hde):
            r = self.rounds.get((msg.migration_id, msg.round))
            if r is not None and r.peer == peer and not r.failed:
                try:
                    r.inbox_send.send_nowait(msg)
                except trio.WouldBlock:
                    r.fail("the diff inbox overflowed")
            return
        assert self.nursery is not None, "rounds arrive only while the node runs"
        self.nursery.start_soon(self._start_round, peer, msg)

    async def _start_round(self, peer: str, msg: V3Round) -> None:
        mid = msg.migration_id
        vm = self.session_ok(mid, peer)
        if vm is None:
            self.send(peer, V3Status(mid, msg.round, f"no migration {mid!r} from {peer} "
                                                     "is running here"))
            return
        writers = self.incoming(mid)
        if writers is None:
            with trio.move_on_after(ACK_TIMEOUT):
                await self._prepared.setdefault(mid, trio.Event()).wait()
            writers = self.incoming(mid)
        if writers is None or set(msg.images) != set(writers):
            self.send(peer, V3Status(mid, msg.round, f"the incoming images of {mid!r} are not "
                                                     f"prepared as {list(msg.images)}"))
            return
        store = self.stores.get(mid)
        if store is None:
            store = self.stores[mid] = await trio.to_thread.run_sync(self._new_store, vm,
                                                                     writers)
        r = _Round(self, peer, msg, vm, [writers[n] for n in msg.images], store)
        for old in [k for k in self.rounds if k[0] == mid]:  # an earlier round is over
            self._drop(old)
        self.rounds[(mid, msg.round)] = r
        self.server.expect(msg.transfer, r.chunk)
        self._transfers[(mid, msg.round)] = msg.transfer
        assert self.nursery is not None
        self.nursery.start_soon(r.consume)
        self.send(peer, V3Status(mid, msg.round))

    def _new_store(self, vm: str, writers: dict[str, ImageWriter]) -> _Store:
        """Worker thread: index every other VM held here and the copy of ``vm`` already in
        the incoming images (an earlier copy of it, or nothing), for dedup and as bases."""
        store = _Store()
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
            store.pages.add(f"{vm}/{name}", w, build_index(w, self.executor))
        return store

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
        self._prepared.pop(mid, None)
