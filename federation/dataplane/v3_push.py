"""Pushed images: a v3 round that sends what changed without asking (docs/qemu.md,
"Downtime").

After a v3 round verified an image, the source knows exactly what the target holds: its
shadow as of that round, whose root the target recomputed and matched. The next round
then needs no diff. The source pushes, per image, one :class:`V3PushOffer` over the
control link — the base root it pushes against, the root the image will have, how many
chunks — and, at once, the chunks of the pages whose content differs from the shadow
(each XORed against the page the target holds where that is smaller,
:func:`mesh.hde.codec.encode_chunk`, the same frames as an HDE round's) over the round's
AMST streams. The target applies each chunk as it lands (a chunk may overtake the
offer), and when the offer's count is in, refreshes its index over the pages written
and answers :class:`~mesh.hde.messages.HdeVerified` with its root.

Against HDE's walk down the tree (offer, base, nodes, groups, fingerprints, wants: six
round trips per image, each through both nodes' worker threads) this costs no round
trip before the first chunk: a round costs what changed. HDE's dedup is kept within the
image: the source knows the target's page fingerprints (the verified index,
:class:`HeldPages`), so a changed page whose new content the target holds at a page this
round does not change goes as a copy in the offer, not as data (a guest moves and
repeats pages: in the self-checking guest's rounds HDE found 30-60 % of the changed
pages that way). Other VMs' pages, which HDE also dedups against, are not looked up.

A target that does not hold the base the source names (only possible if its incoming
image changed outside the migration's verified rounds) fails the image with the reason:
the round fails and the session aborts with the VM at its source. The cores are
sans-I/O and mirror :class:`mesh.hde.source.HdeSource` and
:class:`mesh.hde.target.HdeTarget` (``start``/``handle``, ``verified``, ``stats``), so
the v3 driver runs either the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable, Iterable, Sequence

from mesh import wire
from mesh.core import Event, Notify, Received, Send
from mesh.hde.codec import ChunkError, ChunkPlan, decode_chunk, xor_pages
from mesh.hde.events import ChunkArrived, EncodeChunk, RecomputeRoot, RootRecomputed
from mesh.hde.image import FP_SIZE, PAGE_SIZE, ImageWriter
from mesh.hde.index import PageIndex, changed_pages
from mesh.hde.messages import CHUNK_PAGES, HdeVerified
from mesh.hde.similar import group_chunks
from mesh.wire import U64, Bytes, field

__all__ = ["V3PushOffer", "V3Held", "PushSource", "StreamSource", "PushTarget", "HeldPages",
           "PUSH_FLAG", "push_transfer", "is_push", "push_plans", "apply_chunk",
           "differing_pages", "nonzero_pages", "MAX_COPIES"]

#: Set in the HDE transfer id of a pushed image's chunks (and its offer): the target
#: routes a chunk to the image's push core, not its HDE core, even when the chunk
#: overtakes the offer. HDE transfers of a round are numbered 1..images.
PUSH_FLAG = 1 << 40
_ROOT = 32
#: Copies one offer carries (8 bytes each: 512 KiB, inside a diff message's 1 MiB); the
#: changed pages beyond them go as data.
MAX_COPIES = 65536
_PAIR = struct.Struct("<II")


def push_transfer(image: int) -> int:
    """The transfer id of image ``image`` (0-based) pushed in a round."""
    return PUSH_FLAG | (image + 1)


def is_push(transfer: int) -> bool:
    return bool(transfer & PUSH_FLAG)


@wire.message("v3.push")
class V3PushOffer:
    """Source -> target: image ``transfer`` is pushed against ``base`` (the root the target
    verified last round); after ``chunks`` chunks of ``pages`` pages its root is ``root``."""

    transfer: int = field(U64())
    page_count: int = field(U64())
    base: bytes = field(Bytes(_ROOT, exact=True))
    root: bytes = field(Bytes(_ROOT, exact=True))
    chunks: int = field(U64())
    pages: int = field(U64())
    #: (page, from page) pairs, ``<II`` each: write the target's own page ``from`` (one
    #: this round does not change) at ``page``
    copies: bytes = field(Bytes(MAX_COPIES * _PAIR.size))


@wire.message("v3.held")
class V3Held:
    """Target -> source, before round 1 moves: incoming image ``transfer`` (its push id) of
    ``page_count`` pages holds the content whose root is ``root``. A root of zero pages
    (:func:`mesh.hde.index.zero_index`) is a cold target: the source may then stream the
    image (:class:`StreamSource`) instead of diffing it. Sent only to a source whose
    control link offered :data:`mesh.versions.COLD_PUSH` (an older one would fail the
    round on a diff message it does not know)."""

    transfer: int = field(U64())
    page_count: int = field(U64())
    root: bytes = field(Bytes(_ROOT, exact=True))


def differing_pages(held: PageIndex, now: PageIndex) -> list[int]:
    """Pages whose fingerprint differs between two indexes of one image's pages (what the
    target verified, what the image holds now): no pass over the pages themselves."""
    if held.page_count != now.page_count:
        raise ValueError(f"indexes of {held.page_count} and {now.page_count} pages")
    return changed_pages(bytes(held.fps), bytes(now.fps), held.page_count)


def push_plans(pages: Sequence[int], same: Callable[[int], Hashable] | None = None
               ) -> list[ChunkPlan]:
    """The chunk plans of ``pages`` (ascending): runs of CHUNK_PAGES, numbered from 0;
    with ``same`` (a page's content key), pages with equal keys in one chunk
    (:func:`mesh.hde.similar.group_chunks`), for chunk copies."""
    if same is not None:
        return [ChunkPlan.of_pages(k, c) for k, c in enumerate(group_chunks(pages, same))]
    return [ChunkPlan.of_pages(i // CHUNK_PAGES, pages[i : i + CHUNK_PAGES])
            for i in range(0, len(pages), CHUNK_PAGES)]


def apply_chunk(writer: ImageWriter, frame: bytes | bytearray | memoryview, transfer: int
                ) -> int:
    """Check chunk ``frame`` of ``transfer`` and write its pages into ``writer`` (an XORed
    page against the page it holds); the pages written. Raises ChunkError."""
    chunk = decode_chunk(frame, transfer, writer.page_count)
    for j, p in enumerate(chunk.pages):
        data = chunk.data[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]
        writer.write(p, xor_pages(data, writer.view(p)) if chunk.xor[j] else data)
    return len(chunk.pages)


class HeldPages:
    """Fingerprint -> a page holding it, of what the target verified of one image (its
    index): every entry is true of the verified content. :meth:`advance` moves it to the
    next verified round over the pages that round changed (O(changed))."""

    def __init__(self, index: PageIndex) -> None:
        self.by_fp: dict[bytes, int] = {}
        fps = bytes(index.fps)
        for p in range(index.page_count - 1, -1, -1):  # the lowest page wins
            self.by_fp[fps[p * FP_SIZE : (p + 1) * FP_SIZE]] = p

    def advance(self, old: PageIndex, new: PageIndex, pages: Iterable[int]) -> None:
        changed = list(pages)
        for p in changed:
            fp = old.fp(p)
            if self.by_fp.get(fp) == p:
                del self.by_fp[fp]
        for p in changed:
            self.by_fp.setdefault(new.fp(p), p)

    def copies(self, index: PageIndex, pages: Sequence[int]) -> tuple[list[int], bytes]:
        """(the pages to send as data, the packed copies for the rest) of ``pages`` (the
        round's changed pages, now indexed in ``index``)."""
        changed = set(pages)
        data: list[int] = []
        out = bytearray()
        for p in pages:
            q = self.by_fp.get(index.fp(p))
            if q is None or q in changed or len(out) >= MAX_COPIES * _PAIR.size:
                data.append(p)
            else:
                out += _PAIR.pack(p, q)
        return data, bytes(out)


_ZERO_BLOCK = bytes(CHUNK_PAGES * PAGE_SIZE)
_ZERO_PAGE = bytes(PAGE_SIZE)


def nonzero_pages(first: int, data: bytes) -> list[int]:
    """The pages of ``data`` (whole pages from page ``first``) that are not all zeros: a
    block of CHUNK_PAGES compared at once (most of a guest's zero pages lie in zero
    blocks), then page by page."""
    out: list[int] = []
    n = len(data) // PAGE_SIZE
    block = CHUNK_PAGES * PAGE_SIZE
    for b in range(0, n, CHUNK_PAGES):
        at = b * PAGE_SIZE
        if b + CHUNK_PAGES <= n and data[at : at + block] == _ZERO_BLOCK:
            continue
        for q in range(b, min(n, b + CHUNK_PAGES)):
            if data[q * PAGE_SIZE : (q + 1) * PAGE_SIZE] != _ZERO_PAGE:
                out.append(first + q)
    return out


class _PushReply:
    """What both push sources do with the target's answer (:class:`HdeVerified`)."""

    transfer: int
    peer: str
    failed: str | None
    verified: bool | None
    #: the image's index once it is known (a streamed image's when its copy ended)
    index: PageIndex | None

    def _root(self) -> bytes | None:
        """The root the image must have at the target (None: not offered yet)."""
        return None if self.index is None else self.index.root

    def handle(self, now: float, event: Event) -> list[Notify]:
        if self.failed or self.verified is not None or not isinstance(event, Received):
            return []
        msg = event.message
        if event.peer != self.peer or getattr(msg, "transfer", None) != self.transfer:
            return []
        root = self._root()
        if not isinstance(msg, HdeVerified) or root is None:
            return self._fail(f"unexpected message {type(msg).__name__} to a pushed image")
        self.verified = msg.ok and msg.root == root
        return [Notify("hde.sent", {"transfer": self.transfer, "ok": self.verified})]

    def _fail(self, reason: str) -> list[Notify]:
        self.failed = reason
        return [Notify("hde.failed", {"transfer": self.transfer, "peer": self.peer,
                                      "reason": reason})]


class StreamSource(_PushReply):
    """Streams image ``image`` (0-based in its round) of ``page_count`` pages to a target
    whose copy holds ``base`` (the root of zero pages: a cold target, :class:`V3Held`)
    while the image is being read: :meth:`add` plans the chunks of pages as they are read
    (from the first piece on), :meth:`finish` sends the offer with the root once the
    whole image is read and indexed. The offer follows its chunks, as a pushed round's
    may; the target applies each chunk as it lands and verifies the root it recomputes
    against the offer's, as for any pushed image. ``add`` runs on the thread that reads,
    ``finish`` after it, ``handle`` anywhere after ``finish``."""

    def __init__(self, image: int, peer: str, page_count: int, base: bytes) -> None:
        self.transfer = push_transfer(image)
        self.peer = peer
        self.page_count = page_count
        self.base = base
        self.index: PageIndex | None = None
        self.chunks = 0
        #: pages planned (sent as data): every page that is not zero
        self.sent = 0
        self.chunk_copies = False
        self.failed: str | None = None
        self.verified: bool | None = None

    def add(self, pages: Sequence[int]) -> list[EncodeChunk]:
        """The chunks of ``pages`` (ascending, read since the last call, never zero pages:
        the target's copy holds zeros there)."""
        if self.index is not None:
            raise ValueError(f"pages added to image {self.transfer & ~PUSH_FLAG} after its "
                             "offer")
        if pages and (pages[0] < 0 or pages[-1] >= self.page_count):
            raise ValueError(f"pages {pages[0]}..{pages[-1]} outside {self.page_count}")
        out = []
        for i in range(0, len(pages), CHUNK_PAGES):
            out.append(EncodeChunk(self.transfer, ChunkPlan.of_pages(
                self.chunks, pages[i : i + CHUNK_PAGES]), None))
            self.chunks += 1
        self.sent += len(pages)
        return out

    def finish(self, index: PageIndex) -> list[Send]:
        """The image was read whole and indexed as ``index``: the offer."""
        if index.page_count != self.page_count:
            raise ValueError(f"an index of {index.page_count} pages for an image of "
                             f"{self.page_count}")
        self.index = index
        return [Send(self.peer, V3PushOffer(self.transfer, self.page_count, self.base,
                                            index.root, self.chunks, self.sent, b""))]


class PushSource(_PushReply):
    """Pushes image ``image`` (0-based in its round), now indexed as ``index``, to ``peer``
    against ``base`` (the root the target verified): the ``pages`` that changed. With
    ``copies`` (the target decodes chunk copies), changed pages of equal fingerprints go
    in one chunk, to be encoded with ``copies=True`` (each sent once)."""

    def __init__(self, image: int, peer: str, index: PageIndex, base: bytes,
                 pages: Sequence[int], held: HeldPages | None = None, *,
                 copies: bool = False) -> None:
        self.transfer = push_transfer(image)
        self.peer = peer
        self.index: PageIndex = index
        self.base = base
        #: the round's changed pages (ascending); of them, those sent as data
        self.pages = list(pages)
        self.data, self.copies = (held.copies(index, self.pages) if held is not None
                                  else (self.pages, b""))
        self.chunk_copies = copies
        self.failed: str | None = None
        self.verified: bool | None = None

    def start(self) -> list[Send | EncodeChunk]:
        plans = push_plans(self.data, self.index.fp if self.chunk_copies else None)
        offer = V3PushOffer(self.transfer, self.index.page_count, self.base, self.index.root,
                            len(plans), len(self.data), self.copies)
        return [Send(self.peer, offer),
                *(EncodeChunk(self.transfer, plan, self.base) for plan in plans)]


PushAction = Send | RecomputeRoot | Notify


class PushTarget:
    """Receives image ``image`` pushed by ``peer`` into ``writer``, which holds the image
    whose root is ``held`` (its index before this round)."""

    def __init__(self, image: int, peer: str, writer: ImageWriter, held: bytes,
                 write: Callable[[ImageWriter, bytes | bytearray | memoryview, int], int]
                 = apply_chunk) -> None:
        self.transfer = push_transfer(image)
        self.peer = peer
        self.writer = writer
        self.held = held
        self._write = write
        self.offer: V3PushOffer | None = None
        self.chunks: set[int] = set()
        self.failed: str | None = None
        self.verified = False
        self._recomputing = False
        self.stats = {"pages_wanted": 0, "pages_base": 0, "pages_dedup": 0,
                      "pages_uniform": 0, "chunks_rejected": 0, "fallback_blocks": 0,
                      "pushed": 1}

    def handle(self, now: float, event: Event | ChunkArrived | RootRecomputed
               ) -> list[PushAction]:
        if self.failed or self.verified:
            return []
        try:
            if isinstance(event, ChunkArrived) and event.transfer == self.transfer:
                return self._on_chunk(event)
            if isinstance(event, RootRecomputed) and event.transfer == self.transfer:
                return self._on_root(event)
            if not isinstance(event, Received) or event.peer != self.peer:
                return []
            msg = event.message
            if not isinstance(msg, V3PushOffer) or msg.transfer != self.transfer:
                return []
            return self._on_offer(msg)
        except ChunkError as exc:
            return self._fail(str(exc))

    def _on_offer(self, msg: V3PushOffer) -> list[PushAction]:
        if self.offer is not None:
            return self._fail("a second v3.push offer")
        if msg.page_count != self.writer.page_count:
            return self._fail(f"pushed {msg.page_count} pages, the image has "
                              f"{self.writer.page_count}")
        if msg.base != self.held:
            return self._fail(f"pushed against base {msg.base.hex()[:16]}, this target holds "
                              f"{self.held.hex()[:16]}")
        if len(self.chunks) > msg.chunks or any(c >= msg.chunks for c in self.chunks):
            return self._fail(f"chunks {sorted(self.chunks)} beyond the offer's {msg.chunks}")
        if len(msg.copies) % _PAIR.size:
            return self._fail(f"copies of {len(msg.copies)} bytes are not whole pairs")
        n = self.writer.page_count
        pairs = list(_PAIR.iter_unpack(msg.copies))
        for p, q in pairs:
            if p >= n or q >= n:
                return self._fail(f"a copy of page {q} to page {p} outside {n} pages")
        # the source copies only from pages this round leaves as they were (a wrong one
        # shows as a root that differs)
        for p, q in pairs:
            self.writer.write(p, bytes(self.writer.view(q)))
        self.stats["pages_dedup"] += len(pairs)
        self.offer = msg
        return self._done_yet()

    def _on_chunk(self, ev: ChunkArrived) -> list[PushAction]:
        if ev.chunk_id in self.chunks:
            return []  # delivered twice: an XOR applied twice would undo itself
        if self.offer is not None and ev.chunk_id >= self.offer.chunks:
            return self._fail(f"chunk {ev.chunk_id} beyond the offer's {self.offer.chunks}")
        self.stats["pages_wanted"] += self._write(self.writer, ev.data, self.transfer)
        self.chunks.add(ev.chunk_id)
        return self._done_yet()

    def _done_yet(self) -> list[PushAction]:
        offer = self.offer
        if offer is None or len(self.chunks) < offer.chunks or self._recomputing:
            return []
        if self.stats["pages_wanted"] != offer.pages:
            return self._fail(f"{self.stats['pages_wanted']} pages arrived, the offer said "
                              f"{offer.pages}")
        self._recomputing = True
        return [RecomputeRoot(self.transfer)]

    def _on_root(self, ev: RootRecomputed) -> list[PushAction]:
        assert self.offer is not None
        if not self._recomputing:
            return self._fail("a recomputed root that was not asked for")
        self._recomputing = False
        ok = ev.root == self.offer.root
        reply = Send(self.peer, HdeVerified(transfer=self.transfer, ok=ok, root=ev.root))
        if not ok:
            return [reply, *self._fail(f"the pushed image's root {ev.root.hex()[:16]} is not "
                                       f"the source's {self.offer.root.hex()[:16]}")]
        self.verified = True
        self.stats["pages_base"] = (self.writer.page_count - self.stats["pages_wanted"]
                                    - self.stats["pages_dedup"])
        return [reply, Notify("hde.verified", {"transfer": self.transfer,
                                               "root": ev.root.hex(), **self.stats})]

    def _fail(self, reason: str) -> list[PushAction]:
        self.failed = reason
        return [Notify("hde.failed", {"transfer": self.transfer, "peer": self.peer,
                                      "reason": reason})]
