"""The target side of an HDE transfer: a sans-I/O core.

On an offer it picks its base (the newest copy of that image in its
:class:`~mesh.hde.store.PageStore`, if the tree has the same shape) and walks
the source's tree top-down, descending only into nodes whose digest differs
from the base's. Subtrees that match are copied from the base. For blocks
that differ it fetches the page entries (:mod:`mesh.hde.entries`): a page the
source names as a page of the base is copied from there; a page sent by its
key (a 64-bit fingerprint prefix) is resolved cheapest first: uniform page
(filled), same page at the same position in the base, a page already received
in this transfer, any page in the store (dedup across versions and VMs), a
page already asked for; only the rest is wanted.

Chunks are checked (digest, then every page against its key) before
a single page is written; a bad chunk is asked for again. When every page is
in place the driver recomputes the tree over what was written
(:class:`RecomputeRoot`); only a root equal to the offered one completes the
transfer. Blocks whose digest is wrong are fetched once more without any
dedup, so even a crafted key collision costs time, never correctness.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import zstandard

from mesh.core import Action, Event, Notify, PeerDown, Received, Send
from mesh.hde.codec import ChunkError, decode_chunk, to_ranges, xor_pages
from mesh.hde.entries import iter_entries
from mesh.hde.events import ChunkArrived, RecomputeRoot, RootRecomputed
from mesh.hde.image import FP_SIZE, KEY_SIZE, PAGE_SIZE, UNIFORM_KEY, ImageWriter, page_key
from mesh.hde.index import (
    BLOCK_PAGES,
    DIGEST_SIZE,
    FANOUT,
    GROUP_DIGEST_SIZE,
    GROUP_PAGES,
    ZERO_BLOCK_DIGEST,
    level_sizes,
    root_digest,
    zero_node,
)
from mesh.hde.messages import (
    MAX_ENTRY,
    MAX_FP_BLOCKS,
    MAX_PARENTS,
    MAX_WANT_RANGES,
    HdeBase,
    HdeFingerprints,
    HdeFingerprintsWant,
    HdeGroups,
    HdeGroupsWant,
    HdeNodes,
    HdeNodesWant,
    HdeOffer,
    HdeResend,
    HdeVerified,
    HdeWant,
)
from mesh.hde.source import MAX_RESENDS
from mesh.hde.store import PageStore, StoredImage

__all__ = ["HdeTarget", "WINDOW", "MAX_WANTED_PAGES"]

#: Diff requests in flight at once: 8 replies of <= 512 KiB keep a 100 Mbit/s x 100 ms
#: path (1.25 MB bandwidth-delay product) busy without unbounded buffering.
WINDOW = 8
#: Pages asked for and not yet received before the diff pauses (256 MiB of payload): the
#: target's bookkeeping stays bounded for any image size, and 256 MiB keeps a 10 Gbit/s
#: link busy for 200 ms, far longer than a diff round trip.
MAX_WANTED_PAGES = 65536


TargetAction = Action | RecomputeRoot


class HdeTarget:
    """Receives one image from ``peer`` into the writer ``make_sink(page_count)`` returns."""

    def __init__(self, transfer: int, peer: str, store: PageStore,
                 make_sink: Callable[[int], ImageWriter]) -> None:
        self.transfer = transfer
        self.peer = peer
        self.store = store
        self._make_sink = make_sink
        self.offer: HdeOffer | None = None
        self.sink: ImageWriter | None = None
        self.base: StoredImage | None = None
        self.failed: str | None = None
        self.verified = False
        self.stats = {"pages_wanted": 0, "pages_base": 0, "pages_dedup": 0, "pages_uniform": 0,
                      "chunks_rejected": 0, "fallback_blocks": 0}
        self._queue: deque[HdeNodesWant | HdeGroupsWant | HdeFingerprintsWant] = deque()
        #: requests in flight -> the group masks of a fingerprint request, and whether its
        #: reply carries the blocks' digests
        self._outstanding: dict[tuple[str, int, tuple[int, ...]],
                                tuple[tuple[int, ...], bool]] = {}
        self._wanted: dict[int, bytes] = {}
        self._inflight: dict[bytes, list[int]] = {}
        self._received: dict[bytes, int] = {}
        self._strict: set[int] = set()
        self._rejects: dict[int, int] = {}
        self._diff_done = False
        self._recomputing = False
        self._fallback_done = False

    # ------------------------------------------------------------------ events

    def handle(
        self, now: float, event: Event | ChunkArrived | RootRecomputed
    ) -> list[TargetAction]:
        if self.failed or self.verified:
            return []
        try:
            if isinstance(event, ChunkArrived) and event.transfer == self.transfer:
                return self._on_chunk(event)
            if isinstance(event, RootRecomputed) and event.transfer == self.transfer:
                return self._on_root(event)
            if isinstance(event, PeerDown) and event.peer == self.peer:
                return self._fail(f"peer {self.peer} went down during the transfer")
            if not isinstance(event, Received) or event.peer != self.peer:
                return []
            msg = event.message
            if getattr(msg, "transfer", None) != self.transfer:
                return []
            if isinstance(msg, HdeOffer):
                return self._on_offer(msg)
            if self.offer is None:
                return self._fail(f"{type(msg).__name__} before hde.offer")
            if isinstance(msg, HdeNodes):
                return self._on_nodes(msg)
            if isinstance(msg, HdeGroups):
                return self._on_groups(msg)
            if isinstance(msg, HdeFingerprints):
                return self._on_fps(msg)
            return self._fail(f"unexpected message {type(msg).__name__}")
        except ChunkError as exc:
            return self._fail(str(exc))

    def _fail(self, reason: str) -> list[TargetAction]:
        self.failed = reason
        return [Notify("hde.failed", {"transfer": self.transfer, "peer": self.peer,
                                      "reason": reason})]

    # ------------------------------------------------------------------ the diff

    def _on_offer(self, msg: HdeOffer) -> list[TargetAction]:
        if self.offer is not None:
            return self._fail("a second hde.offer")
        if msg.page_count == 0 or root_digest(msg.page_count, msg.top) != msg.root:
            return self._fail("hde.offer: root does not match page count and top node")
        self.offer = msg
        self.sink = self._make_sink(msg.page_count)
        if self.sink.page_count != msg.page_count:
            return self._fail(f"sink holds {self.sink.page_count} pages, offer {msg.page_count}")
        sizes = self._sizes = level_sizes(msg.page_count)
        self._nblocks = sizes[0]
        self._expected = bytearray(sizes[0] * DIGEST_SIZE)
        base = self.store.base(msg.image)
        if base is not None and base.index.page_count == msg.page_count:
            self.base = base
        out: list[TargetAction] = [Send(self.peer, HdeBase(
            transfer=self.transfer, base_root=self.base.index.root if self.base else None))]
        if self.base is None:
            # No base: the tree is compared with an all-zero image's, whose digests are
            # known; a zero subtree costs nothing, only blocks with data are listed.
            top = len(sizes) - 1
            if msg.top == self._ref_node(top, 0):
                self._same_subtree(top, 0)
            elif top == 0:
                self._want_fps([0])
            else:
                self._want_nodes(top, [0])
        elif self.base.index.top == msg.top:
            self._same_subtree(len(sizes) - 1, 0)
        elif len(sizes) == 1:
            self._want_groups([0])
        else:
            self._want_nodes(len(sizes) - 1, [0])
        return out + self._pump()

    def _want_nodes(self, level: int, parents: list[int]) -> None:
        for i in range(0, len(parents), MAX_PARENTS):
            self._queue.append(HdeNodesWant(transfer=self.transfer, level=level,
                                            parents=tuple(parents[i : i + MAX_PARENTS])))

    def _want_groups(self, blocks: list[int]) -> None:
        for i in range(0, len(blocks), MAX_FP_BLOCKS):
            self._queue.append(HdeGroupsWant(transfer=self.transfer,
                                             blocks=tuple(blocks[i : i + MAX_FP_BLOCKS])))

    def _groups_of(self, b: int) -> list[range]:
        pages = self._block_range(b)
        return [range(p, min(p + GROUP_PAGES, pages.stop))
                for p in range(pages.start, pages.stop, GROUP_PAGES)]

    def _want_fps(self, blocks: range | list[int], masks: list[int] | None = None,
                  digests: bool = True) -> None:
        """Ask for the fingerprints of ``blocks`` (of the groups in ``masks``; default all),
        and for their digests unless ``hde.groups`` brought them (``digests`` False)."""
        blocks = list(blocks)
        if masks is None:
            masks = [(1 << len(self._groups_of(b))) - 1 for b in blocks]
        for i in range(0, len(blocks), MAX_FP_BLOCKS):
            part = blocks[i : i + MAX_FP_BLOCKS]
            self._queue.append(HdeFingerprintsWant(
                transfer=self.transfer, blocks=tuple(part),
                masks=tuple(masks[i : i + MAX_FP_BLOCKS]),
                plain=any(b in self._strict for b in part), digests=digests))

    def _pump(self) -> list[TargetAction]:
        out: list[TargetAction] = []
        while self._queue and len(self._outstanding) < WINDOW:
            if (not isinstance(self._queue[0], HdeNodesWant)
                    and len(self._wanted) >= MAX_WANTED_PAGES):
                break
            req = self._queue.popleft()
            if isinstance(req, HdeNodesWant):
                self._outstanding[("nodes", req.level, req.parents)] = ((), False)
            elif isinstance(req, HdeGroupsWant):
                self._outstanding[("groups", 0, req.blocks)] = ((), False)
            else:
                self._outstanding[("fps", 0, req.blocks)] = (req.masks, req.digests)
            out.append(Send(self.peer, req))
        if not self._queue and not self._outstanding and not self._diff_done:
            self._diff_done = True
            out.append(Send(self.peer, HdeWant(transfer=self.transfer, ranges=(), flush=True)))
            out += self._maybe_finish()
        return out

    def _ref_node(self, level: int, i: int) -> bytes | None:
        """What node ``i`` at ``level`` is compared with: the base's, or with no base an
        all-zero image's (None where that is not known: the last, partial node)."""
        if self.base is not None:
            return self.base.index.node(level, i)
        assert self.offer is not None
        return zero_node(level, i, self.offer.page_count)

    def _same_subtree(self, level: int, node: int) -> None:
        """Node ``node`` at ``level`` equals the base's: copy its pages from the base (with
        no base it equals an all-zero subtree: its pages are zeros)."""
        assert self.sink is not None
        span = FANOUT**level
        b0, b1 = node * span, min((node + 1) * span, self._nblocks)
        if self.base is None:
            p0, p1 = b0 * BLOCK_PAGES, min(b1 * BLOCK_PAGES, self.sink.page_count)
            self._expected[b0 * DIGEST_SIZE : b1 * DIGEST_SIZE] = \
                ZERO_BLOCK_DIGEST * (b1 - b0)
            if not self.sink.zeroed:  # (a new image's pages are zeros until written)
                self.sink.fill(p0, p1 - p0, 0)
            self.stats["pages_uniform"] += p1 - p0
            return
        self._expected[b0 * DIGEST_SIZE : b1 * DIGEST_SIZE] = \
            self.base.index.levels[0][b0 * DIGEST_SIZE : b1 * DIGEST_SIZE]
        p0, p1 = b0 * BLOCK_PAGES, min(b1 * BLOCK_PAGES, self.sink.page_count)
        self.sink.copy(self.base.image, p0, p0, p1 - p0)
        self.stats["pages_base"] += p1 - p0

    def _on_nodes(self, msg: HdeNodes) -> list[TargetAction]:
        key = ("nodes", msg.level, msg.parents)
        if key not in self._outstanding:
            return self._fail(f"hde.nodes for level {msg.level} that was not asked for")
        del self._outstanding[key]
        below = msg.level - 1
        if not 0 <= below < len(self._sizes) - 1:
            return self._fail(f"hde.nodes: no level {msg.level} below the top")
        n_below = self._sizes[below]
        differ: list[int] = []
        pos = 0
        for parent in msg.parents:
            first, last = parent * FANOUT, min(parent * FANOUT + FANOUT, n_below)
            for child in range(first, last):
                d = msg.digests[pos : pos + DIGEST_SIZE]
                pos += DIGEST_SIZE
                if len(d) != DIGEST_SIZE:
                    return self._fail("hde.nodes: fewer digests than children")
                if d == self._ref_node(below, child):
                    self._same_subtree(below, child)
                else:
                    differ.append(child)
        if pos != len(msg.digests):
            return self._fail("hde.nodes: more digests than children")
        if below == 0 and self.base is None:
            self._want_fps(differ)
        elif below == 0:
            self._want_groups(differ)
        else:
            self._want_nodes(below, differ)
        return self._pump()

    def _on_groups(self, msg: HdeGroups) -> list[TargetAction]:
        key = ("groups", 0, msg.blocks)
        if key not in self._outstanding:
            return self._fail("hde.groups for blocks that were not asked for")
        del self._outstanding[key]
        assert self.base is not None and self.sink is not None
        groups = [self._groups_of(b) for b in msg.blocks]
        if (len(msg.digests) != len(msg.blocks) * DIGEST_SIZE
                or len(msg.groups) != sum(len(g) for g in groups) * GROUP_DIGEST_SIZE):
            return self._fail("hde.groups: digests do not match the blocks")
        blocks, masks = [], []
        off = 0
        for i, b in enumerate(msg.blocks):
            self._expected[b * DIGEST_SIZE : (b + 1) * DIGEST_SIZE] = \
                msg.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            base_groups = self.base.index.groups(b)
            mask = 0
            for g, pages in enumerate(groups[i]):
                here = slice(g * GROUP_DIGEST_SIZE, (g + 1) * GROUP_DIGEST_SIZE)
                if msg.groups[off + here.start : off + here.stop] == base_groups[here]:
                    self.sink.copy(self.base.image, pages.start, pages.start, len(pages))
                    self.stats["pages_base"] += len(pages)
                else:
                    mask |= 1 << g
            off += len(groups[i]) * GROUP_DIGEST_SIZE
            if mask:
                blocks.append(b)
                masks.append(mask)
        self._want_fps(blocks, masks, digests=False)
        return self._pump()

    def _on_fps(self, msg: HdeFingerprints) -> list[TargetAction]:
        key = ("fps", 0, msg.blocks)
        if key not in self._outstanding:
            return self._fail("hde.fps for blocks that were not asked for")
        masks, with_digests = self._outstanding.pop(key)
        assert self.sink is not None
        pages = [[p for g, r in enumerate(self._groups_of(b)) if mask >> g & 1 for p in r]
                 for b, mask in zip(msg.blocks, masks, strict=True)]
        listed = [p for block_pages in pages for p in block_pages]
        try:
            data = zstandard.ZstdDecompressor().decompress(
                msg.fps, max_output_size=len(listed) * MAX_ENTRY)
        except zstandard.ZstdError as exc:
            return self._fail(f"hde.fps: zstd: {exc}")
        if len(msg.digests) != (len(msg.blocks) * DIGEST_SIZE if with_digests else 0):
            return self._fail("hde.fps: digests do not match the blocks")
        base = self.base
        # Checked whole before any page is placed: a malformed reply changes nothing.
        entries = list(iter_entries(data, listed, None if base is None else base.index.page_count))
        if any(k is None and p // BLOCK_PAGES in self._strict for p, k, _ in entries):
            return self._fail("hde.fps: a page of a re-fetched block named a base page")
        wants: list[int] = []
        for i, b in enumerate(msg.blocks if with_digests else ()):
            self._expected[b * DIGEST_SIZE : (b + 1) * DIGEST_SIZE] = \
                msg.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
        for p, k, q in entries:
            if k is None:
                assert base is not None and self.sink is not None and q is not None
                k = bytes(base.index.fps[q * FP_SIZE : q * FP_SIZE + KEY_SIZE])
                if q == p or page_key(base.image.view(q)) == k:
                    self.sink.copy(base.image, q, p, 1)
                    self.stats["pages_base" if p == q else "pages_dedup"] += 1
                    continue
                # The base is the image being written (a migration target's incoming copy
                # is its own base) and this transfer already overwrote page q: resolve p
                # by its key like any other page.
            if self._resolve(p, k, strict=p // BLOCK_PAGES in self._strict):
                wants.append(p)
        out: list[TargetAction] = []
        ranges = to_ranges(wants)
        step = 2 * MAX_WANT_RANGES
        for i in range(0, len(ranges), step):
            out.append(Send(self.peer, HdeWant(transfer=self.transfer,
                                               ranges=tuple(ranges[i : i + step]),
                                               flush=False)))
        return out + self._pump()

    def _block_range(self, b: int) -> range:
        if b >= self._nblocks:
            raise ChunkError(f"hde.fps: no block {b}")
        assert self.sink is not None
        return range(b * BLOCK_PAGES, min((b + 1) * BLOCK_PAGES, self.sink.page_count))

    def _resolve(self, p: int, fp: bytes, strict: bool) -> bool:
        """Put page ``p`` in place from what this side holds; True if it must be sent."""
        sink = self.sink
        assert sink is not None
        if strict:
            self._wanted[p] = fp
            self.stats["pages_wanted"] += 1
            return True
        byte = UNIFORM_KEY.get(fp)
        if byte is not None:
            sink.fill(p, 1, byte)
            self.stats["pages_uniform"] += 1
            return False
        base = self.base
        if base is not None and base.index.fps[p * FP_SIZE : p * FP_SIZE + KEY_SIZE] == fp:
            sink.copy(base.image, p, p, 1)
            self.stats["pages_base"] += 1
            return False
        if fp in self._received:
            sink.copy(sink, self._received[fp], p, 1)
            self.stats["pages_dedup"] += 1
            return False
        hit = self.store.lookup(fp)
        # A stored image may have changed since it was indexed (the incoming copy itself,
        # written by this transfer or an earlier round): a hit counts only if it still holds
        # the key.
        if hit is not None and page_key(hit[0].view(hit[1])) == fp:
            sink.copy(hit[0], hit[1], p, 1)
            self.stats["pages_dedup"] += 1
            return False
        waiting = self._inflight.get(fp)
        if waiting is not None:
            waiting.append(p)
            self.stats["pages_dedup"] += 1
            return False
        self._inflight[fp] = [p]
        self._wanted[p] = fp
        self.stats["pages_wanted"] += 1
        return True

    # ------------------------------------------------------------------ payload

    def _on_chunk(self, ev: ChunkArrived) -> list[TargetAction]:
        if self.offer is None or self.sink is None:
            return self._fail("a chunk before hde.offer")
        try:
            chunk = decode_chunk(ev.data, self.transfer, self.offer.page_count)
            if chunk.chunk_id != ev.chunk_id:
                raise ChunkError(f"chunk {ev.chunk_id}: frame says chunk {chunk.chunk_id}")
            pages = self._check_pages(chunk.chunk_id, chunk.pages, chunk.xor, chunk.data)
        except ChunkError as exc:
            return self._reject(ev.chunk_id, str(exc))
        for p, data in pages:
            fp = self._wanted.pop(p)
            # A strict page (re-fetch after a failed block) serves no other page: its key
            # may be the very one that collided.
            waiting = [p] if p // BLOCK_PAGES in self._strict else self._inflight.pop(fp, [p])
            for q in waiting:
                self.sink.write(q, data)
            self._received[fp] = p
        return self._pump() + self._maybe_finish()

    def _check_pages(self, cid: int, pages: tuple[int, ...], xor: tuple[bool, ...],
                     data: bytes) -> list[tuple[int, bytes]]:
        """Every page of a chunk, un-XORed and checked against its key; a chunk
        with any bad page is refused whole."""
        out = []
        mv = memoryview(data)
        for i, p in enumerate(pages):
            if p not in self._wanted:
                continue  # a duplicate delivery of a page already written
            page: bytes | memoryview = mv[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            if xor[i]:
                if self.base is None:
                    raise ChunkError(f"chunk {cid}: page {p} is a delta but there is no base")
                page = xor_pages(page, self.base.image.view(p))
            if page_key(page) != self._wanted[p]:
                raise ChunkError(f"chunk {cid}: page {p} does not match its key")
            out.append((p, bytes(page)))
        return out

    def _reject(self, cid: int, reason: str) -> list[TargetAction]:
        self.stats["chunks_rejected"] += 1
        self._rejects[cid] = self._rejects.get(cid, 0) + 1
        if self._rejects[cid] > MAX_RESENDS:
            return self._fail(f"chunk {cid} rejected {self._rejects[cid]} times: {reason}")
        return [Notify("hde.chunk_rejected", {"transfer": self.transfer, "chunk": cid,
                                              "reason": reason}),
                Send(self.peer, HdeResend(transfer=self.transfer, chunk_ids=(cid,)))]

    # ------------------------------------------------------------------ verification

    def _maybe_finish(self) -> list[TargetAction]:
        if self._diff_done and not self._wanted and not self._recomputing:
            self._recomputing = True
            return [RecomputeRoot(self.transfer)]
        return []

    def _on_root(self, ev: RootRecomputed) -> list[TargetAction]:
        assert self.offer is not None
        if not self._recomputing:
            return self._fail("a recomputed root that was not asked for")
        self._recomputing = False
        if ev.root == self.offer.root:
            self.verified = True
            return [Send(self.peer, HdeVerified(transfer=self.transfer, ok=True, root=ev.root)),
                    Notify("hde.verified", {"transfer": self.transfer, "root": ev.root.hex(),
                                            **self.stats})]
        bad = [b for b in range(self._nblocks)
               if ev.blocks[b * DIGEST_SIZE : (b + 1) * DIGEST_SIZE]
               != self._expected[b * DIGEST_SIZE : (b + 1) * DIGEST_SIZE]]
        if self._fallback_done or not bad:
            out = self._fail(f"root mismatch after assembly ({len(bad)} blocks differ)")
            return [Send(self.peer, HdeVerified(transfer=self.transfer, ok=False,
                                                root=ev.root)), *out]
        # Fetch the bad blocks once more, every page sent, no dedup.
        self._fallback_done = True
        self._strict = set(bad)
        self.stats["fallback_blocks"] = len(bad)
        self._diff_done = False
        self._want_fps(bad)
        return [Notify("hde.fallback", {"transfer": self.transfer, "blocks": len(bad)}),
                *self._pump()]
