"""An in-process driver that runs one HDE transfer between a source and a target core.

It is the glue a node's runtime does over a channel and AMST, minus the
network: every message is encoded and decoded with the real codec (and its
bytes counted), chunks are encoded on an executor's threads, and the target's
image is re-indexed when the target asks. Tests and ``dwcp bench hde`` use
it; a fault hook may corrupt chunk frames in transit.
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import Executor

import attrs

from mesh import wire
from mesh.core import Notify, Received, Send
from mesh.hde.codec import encode_chunk
from mesh.hde.events import ChunkArrived, EncodeChunk, RecomputeRoot, RootRecomputed
from mesh.hde.image import ImageWriter, PageSource
from mesh.hde.index import PageIndex, build_index, zero_index
from mesh.hde.source import HdeSource
from mesh.hde.store import PageStore
from mesh.hde.target import HdeTarget

__all__ = ["Carry", "Frame", "TransferResult", "run_transfer", "memory_sink"]

SOURCE, TARGET = "source", "target"


@attrs.define
class TransferResult:
    verified: bool
    failure: str | None
    control_bytes: int
    chunk_bytes: int
    chunks_sent: int
    image: ImageWriter | None
    notes: list[Notify]
    stats: dict[str, int]
    #: bytes of diff messages by wire tag
    control_by_tag: dict[str, int] = attrs.field(factory=dict)

    @property
    def wire_bytes(self) -> int:
        return self.control_bytes + self.chunk_bytes


Frame = bytes | bytearray
#: Carries frames over a real path: ``carry(frames, to_target)`` sends each frame as it
#: comes (source -> target when ``to_target``) and returns them as they arrived.
Carry = Callable[[Iterable[Frame], bool], list[Frame]]


def memory_sink(page_count: int) -> ImageWriter:
    """A new image in anonymous memory: zero pages until written (a bytearray of a GiB
    would be written with zeros first, 5 s under load)."""
    w = ImageWriter(mmap.mmap(-1, page_count * 4096), "target")
    w.zeroed = True
    return w


def run_transfer(
    *,
    image: PageSource,
    index: PageIndex,
    name: str,
    store: PageStore,
    level: int,
    references: Mapping[bytes, PageSource] | None = None,
    reference_indexes: Mapping[bytes, PageIndex] | None = None,
    executor: Executor | None = None,
    make_sink: Callable[[int], ImageWriter] = memory_sink,
    corrupt: Callable[[int, int, bytes | bytearray], bytes | bytearray] | None = None,
    transfer: int = 1,
    carry: Carry | None = None,
    similar: Callable[[int], Hashable | None] | None = None,
    sink_index: PageIndex | None = None,
) -> TransferResult:
    """Move ``image`` into a new image at the target holding ``store`` (which holds the new
    image too once it is verified). ``corrupt(chunk_id, attempt, frame)`` may alter a chunk
    frame on its way. ``reference_indexes``: the indexes of some ``references``, which let
    the source name pages copied within the target's base (:mod:`mesh.hde.entries`).
    ``carry``: every diff message (each way) and chunk frame crosses it, and the receiving
    core gets the bytes that arrived; a batch of chunks is handed over as it is encoded,
    so encoding overlaps the path's transmission. ``similar``: chunk pages by similarity
    (:class:`~mesh.hde.source.HdeSource`). ``sink_index``: the index of what the sink holds
    before the transfer (a migration target that is its own base): the sink's ``written``
    pages are tracked from its creation and the root is recomputed over the blocks
    written, not over the whole image; so is it for a new, zero sink (``zeroed``, as
    :func:`memory_sink` makes), over the pages the transfer wrote."""

    def tracked_sink(pages: int) -> ImageWriter:
        sink = make_sink(pages)
        if sink_index is not None or sink.zeroed:
            sink.written = set()
        return sink

    refs = dict(references or {})
    src = HdeSource(transfer, TARGET, name, index, refs, reference_indexes, similar)
    dst = HdeTarget(transfer, SOURCE, store, tracked_sink)
    work: deque[tuple[str, object]] = deque((SOURCE, a) for a in src.start())
    encodes: list[EncodeChunk] = []
    attempts: dict[int, int] = {}
    control = chunk_bytes = chunks = 0
    notes: list[Notify] = []
    by_tag: dict[str, int] = {}

    def sent(batch: list[EncodeChunk], encoded: Iterable[Frame]) -> Iterable[Frame]:
        """The batch's frames as they are encoded, counted (and corrupted) on the way."""
        nonlocal chunk_bytes, chunks
        for a, frame in zip(batch, encoded, strict=True):
            cid = a.plan.chunk_id
            attempts[cid] = attempts.get(cid, 0) + 1
            chunk_bytes += len(frame)
            chunks += 1
            yield frame if corrupt is None else corrupt(cid, attempts[cid], frame)

    def deliver(who: str, event: object) -> None:
        core = src if who == SOURCE else dst
        work.extend((who, a) for a in core.handle(0.0, event))  # type: ignore[arg-type]

    while work or encodes:
        if not work:
            # Encode every chunk planned so far in parallel, then deliver them in order.
            batch, encodes = encodes, []

            def enc(a: EncodeChunk) -> bytes | bytearray:
                ref = refs[a.reference_root] if a.reference_root is not None else None
                return encode_chunk(a.transfer, a.plan, image, ref, level)

            encoded = executor.map(enc, batch) if executor else map(enc, batch)
            out = sent(batch, encoded)
            frames = carry(out, True) if carry is not None else list(out)
            for a, frame in zip(batch, frames, strict=True):
                deliver(TARGET, ChunkArrived(transfer, a.plan.chunk_id, frame))
            continue
        who, action = work.popleft()
        if isinstance(action, Send):
            frame = wire.encode(action.message)
            if carry is not None:
                frame = bytes(carry([frame], who == SOURCE)[0])
            control += len(frame)
            tag = action.message.wire_tag
            by_tag[tag] = by_tag.get(tag, 0) + len(frame)
            deliver(TARGET if who == SOURCE else SOURCE, Received(who, wire.decode(frame), frame))
        elif isinstance(action, EncodeChunk):
            encodes.append(action)
        elif isinstance(action, RecomputeRoot):
            assert dst.sink is not None
            if sink_index is not None and dst.sink.written is not None:
                ix = sink_index.copy()
                ix.refresh(dst.sink, dst.sink.written, executor)
            elif dst.base is None and dst.sink.zeroed and dst.sink.written is not None:
                # a new image: zero but for what the transfer wrote (its zero blocks were
                # left as they are), so the tree is the zero tree refreshed over those pages
                ix = zero_index(dst.sink.page_count)
                ix.refresh(dst.sink, dst.sink.written, executor)
            else:
                ix = build_index(dst.sink, executor)
            deliver(TARGET, RootRecomputed(transfer, bytes(ix.levels[0]), ix.root))
            if dst.verified:
                # The verified copy now serves dedup and is this image's base next time.
                store.add(name, dst.sink, ix)
        elif isinstance(action, Notify):
            notes.append(action)
    return TransferResult(
        verified=dst.verified and bool(src.verified),
        failure=dst.failed or src.failed,
        control_bytes=control,
        chunk_bytes=chunk_bytes,
        chunks_sent=chunks,
        image=dst.sink,
        notes=notes,
        stats=dict(dst.stats),
        control_by_tag=by_tag,
    )
