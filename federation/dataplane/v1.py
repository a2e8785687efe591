"""The node's data plane, version 1: one stream of pages over the control link.

A pre-copy round (:class:`federation.migration.vocabulary.SendRound`) is carried as
:class:`PagesChunk` messages of at most ``CHUNK_PAGES`` contiguous pages on the
authenticated, encrypted control link to the target, which writes each chunk into
the incoming images and answers :class:`PagesAck` with the chunk's sequence
number. The sender keeps at most ``WINDOW`` chunks unacknowledged, so a round
never overfills the link's outbox (``mesh.runtime.link.OUTBOX_MESSAGES``).

This is DESIGN.md's v1 ("one stream, no delta, no compression"): every page of
round 1 and every dirtied page of later rounds crosses the link as it is. A
migration uses it when the rollout policy or a peer rules out v3 (HDE over AMST,
:mod:`federation.dataplane.v3`), and when v3 falls back mid-migration.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio

from federation.migration.vocabulary import RoundSent, SendRound, TransferProgress
from federation.vms.backend import VmBackend
from mesh import wire
from mesh.hde.image import PAGE_SIZE, ImageError, ImageWriter
from mesh.wire import U64, Bytes, Text, field

__all__ = ["PagesChunk", "PagesAck", "DATA_TAGS", "RoundSender", "RoundFailed", "write_chunk",
           "CHUNK_PAGES", "WINDOW", "ACK_TIMEOUT", "runs"]

#: Pages per chunk: 256 KiB, a few websocket frames' worth; far under the channel's
#: 8 MiB frame limit, large enough that per-message overhead (CBOR header, AEAD tag)
#: is below 0.1 %.
CHUNK_PAGES = 64
#: Unacknowledged chunks per round: 16 x 256 KiB = 4 MiB in flight, a bandwidth-delay
#: product of 400 Mbit/s at 80 ms, and 64 x under the link outbox (1024 messages).
WINDOW = 16
#: No acknowledgement for this long fails the round (then the session aborts). The
#: same bound as a session's stall timer (federation.migration.vocabulary.STALL_TIMEOUT).
ACK_TIMEOUT = 30.0

DATA_TAGS = ("data.v1.",)


@wire.message("data.v1.pages", max_size=CHUNK_PAGES * PAGE_SIZE + 1024)
class PagesChunk:
    migration_id: str = field(Text(128))
    round: int = field(U64(1000))
    seq: int = field(U64())
    image: str = field(Text(16))
    page: int = field(U64())
    data: bytes = field(Bytes(CHUNK_PAGES * PAGE_SIZE))


@wire.message("data.v1.ack")
class PagesAck:
    migration_id: str = field(Text(128))
    round: int = field(U64(1000))
    seq: int = field(U64())
    error: str = field(Text(256), default="")


class RoundFailed(Exception):
    """A round could not be delivered (link down, target refused, no acknowledgement)."""


def runs(pages: Sequence[int], limit: int = CHUNK_PAGES) -> Iterator[tuple[int, int]]:
    """Sorted page numbers -> (first, count) runs of contiguous pages, each <= ``limit``."""
    start = prev = -2
    for p in pages:
        if p == prev + 1 and p - start < limit:
            prev = p
            continue
        if start >= 0:
            yield start, prev - start + 1
        start = prev = p
    if start >= 0:
        yield start, prev - start + 1


def write_chunk(writers: dict[str, ImageWriter], chunk: PagesChunk) -> str:
    """Write ``chunk`` into the incoming images; returns "" or why it was refused."""
    img = writers.get(chunk.image)
    if img is None:
        return f"no incoming image {chunk.image!r}"
    try:
        img.write(chunk.page, chunk.data)
    except ImageError as exc:
        return str(exc)
    return ""


class RoundSender:
    """Sends one round of one migration; ``ack`` is fed the target's acknowledgements."""

    def __init__(self, action: SendRound, target: str, backend: VmBackend,
                 send: Callable[[str, Any], bool], marks: dict[str, int]) -> None:
        self.action = action
        self.target = target
        self.backend = backend
        self._send = send
        self.marks = marks
        self.acked = -1
        self.error = ""
        self._changed = trio.Event()

    def ack(self, msg: PagesAck) -> None:
        if msg.round != self.action.round:
            return
        if msg.error:
            self.error = msg.error
        self.acked = max(self.acked, msg.seq)
        self._changed.set()
        self._changed = trio.Event()

    def _pages(self) -> dict[str, list[int]]:
        a = self.action
        previous = self.marks.get(a.migration_id)
        mark = self.backend.dirty_mark(a.vm)
        self.marks[a.migration_id] = mark
        if not a.dirty or previous is None:
            return {name: list(range(n)) for name, n in self.backend.info(a.vm).layout}
        return self.backend.dirty_since(a.vm, previous)

    async def run(self, progress: Callable[[TransferProgress], Awaitable[None]]) -> RoundSent:
        """Send the round; ``progress(TransferProgress)`` is awaited now and then."""
        a = self.action
        started = trio.current_time()
        pages = await trio.to_thread.run_sync(self._pages)
        images = await trio.to_thread.run_sync(self.backend.open_images, a.vm)
        seq = -1
        sent_pages = logical = on_wire = 0
        last_report = started
        try:
            for name in sorted(pages):
                for first, count in runs(pages[name]):
                    data = bytes(images[name].view(first, count))
                    seq += 1
                    msg = PagesChunk(a.migration_id, a.round, seq, name, first, data)
                    await self._wait_window(seq)
                    if not self._send(self.target, msg):
                        raise RoundFailed(f"the link to {self.target} is down or full")
                    sent_pages += count
                    logical += len(data)
                    on_wire += len(wire.encode(msg))
                    now = trio.current_time()
                    if now - last_report >= 1.0:  # keeps the session's stall timer quiet
                        last_report = now
                        await progress(TransferProgress(a.round, logical))
            await self._wait_window(seq + WINDOW)  # everything acknowledged
        finally:
            for img in images.values():
                img.close()
        mark = self.marks[a.migration_id]
        dirty = await trio.to_thread.run_sync(self.backend.dirty_since, a.vm, mark)
        seconds = trio.current_time() - started
        return RoundSent(a.round, sent_pages, logical, on_wire, seconds,
                         sum(len(p) for p in dirty.values()))

    async def _wait_window(self, seq: int) -> None:
        deadline = trio.current_time() + ACK_TIMEOUT
        while seq - self.acked > WINDOW:
            if self.error:
                raise RoundFailed(f"{self.target} refused a chunk: {self.error}")
            with trio.move_on_at(deadline):
                await self._changed.wait()
            if trio.current_time() >= deadline and seq - self.acked > WINDOW:
                raise RoundFailed(f"no acknowledgement from {self.target} in "
                                  f"{ACK_TIMEOUT:.0f} s")
        if self.error:
            raise RoundFailed(f"{self.target} refused a chunk: {self.error}")

