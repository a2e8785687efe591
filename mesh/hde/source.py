"""The source side of an HDE transfer: a sans-I/O core.

It answers the target's walk down the tree, then turns the target's wants
into chunk plans. Encoding a chunk is CPU work on page data, so the core does
not do it: it returns :class:`EncodeChunk` actions and the driver runs
:func:`mesh.hde.codec.encode_chunk` on its worker threads (AMST then carries
the frames under their chunk id).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from mesh.core import Action, Event, Notify, PeerDown, Received, Send
from mesh.hde.codec import ChunkError, ChunkPlan, check_ranges, compress
from mesh.hde.entries import ReferenceMap, encode_entries
from mesh.hde.events import EncodeChunk
from mesh.hde.index import GROUP_PAGES, PageIndex
from mesh.hde.messages import (
    CHUNK_PAGES,
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
from mesh.hde.similar import LEAD_PAGES, group_chunks

__all__ = ["HdeSource", "MAX_RESENDS"]


#: A chunk corrupted this many times in a row means a broken path or a hostile
#: peer, not line noise: the transfer fails rather than looping.
MAX_RESENDS = 3
#: zstd level for page key lists: they are random except for runs of equal pages,
#: which even level 1 collapses.
FP_LEVEL = 1
#: With ``similar``, wanted pages are grouped over windows of this many pages: the target
#: asks for at most this many pages not yet received (mesh.hde.target.MAX_WANTED_PAGES),
#: so a full window is always planned before the target pauses. Measured on the bench
#: guest (mesh.hde.similar): near-copies lie far apart, and a window of 16,384 pages kept
#: 2 % of the 11 % that the whole 65,536-page image gave.
GROUP_WINDOW = 65536


class HdeSource:
    """Sends image ``name`` (indexed as ``index``) to ``peer``. ``references`` are the roots
    of earlier images this side still holds, usable as XOR bases; ``reference_indexes``
    the indexes of some of them: when the target's base is one of those, the diff names
    pages copied within it instead of sending their keys (:mod:`mesh.hde.entries`).
    ``similar``: a page's similarity key (:func:`mesh.hde.similar.page_sketches`); with
    it, wanted pages (after the first :data:`LEAD_PAGES`) are gathered over
    :data:`GROUP_WINDOW` pages and chunked with equal keys together (smaller output, at
    the sketch's CPU: for links slower than the CPU)."""

    def __init__(self, transfer: int, peer: str, name: str, index: PageIndex,
                 references: Mapping[bytes, object] | None = None,
                 reference_indexes: Mapping[bytes, PageIndex] | None = None,
                 similar: Callable[[int], Hashable | None] | None = None) -> None:
        self.transfer = transfer
        self.peer = peer
        self.name = name
        self.index = index
        self._references = frozenset(references or ())
        self.reference_root: bytes | None = None
        self._reference_indexes = dict(reference_indexes or {})
        self._reference_map: ReferenceMap | None = None
        self._similar = similar
        self._pending: list[tuple[int, int]] = []
        self._pending_count = 0
        #: wanted pages planned as they came (LEAD_PAGES), with ``similar``
        self._lead = 0
        self._plans: dict[int, ChunkPlan] = {}
        self._resends: dict[int, int] = {}
        self.failed: str | None = None
        self.verified: bool | None = None

    @property
    def chunks_planned(self) -> int:
        return len(self._plans)

    def start(self) -> list[Action | EncodeChunk]:
        ix = self.index
        return [Send(self.peer, HdeOffer(transfer=self.transfer, image=self.name,
                                         page_count=ix.page_count, top=ix.top, root=ix.root))]

    def handle(self, now: float, event: Event) -> list[Action | EncodeChunk]:
        if isinstance(event, PeerDown) and event.peer == self.peer and not self.failed:
            return self._fail(f"peer {self.peer} went down during the transfer")
        if not isinstance(event, Received) or event.peer != self.peer:
            return []
        msg = event.message
        if getattr(msg, "transfer", None) != self.transfer or self.failed or self.verified:
            return []
        try:
            if isinstance(msg, HdeBase):
                return self._on_base(msg)
            if isinstance(msg, HdeNodesWant):
                return self._on_nodes_want(msg)
            if isinstance(msg, HdeGroupsWant):
                return self._on_groups_want(msg)
            if isinstance(msg, HdeFingerprintsWant):
                return self._on_fps_want(msg)
            if isinstance(msg, HdeWant):
                return self._on_want(msg)
            if isinstance(msg, HdeResend):
                return self._on_resend(msg)
            if isinstance(msg, HdeVerified):
                self.verified = msg.ok and msg.root == self.index.root
                return [Notify("hde.sent", {"transfer": self.transfer, "ok": self.verified,
                                            "chunks": len(self._plans)})]
        except ChunkError as exc:
            return self._fail(str(exc))
        return self._fail(f"unexpected message {type(msg).__name__}")

    def _fail(self, reason: str) -> list[Action | EncodeChunk]:
        self.failed = reason
        return [Notify("hde.failed", {"transfer": self.transfer, "peer": self.peer,
                                      "reason": reason})]

    def _on_base(self, msg: HdeBase) -> list[Action | EncodeChunk]:
        if msg.base_root is not None and msg.base_root in self._references:
            self.reference_root = msg.base_root
            rix = self._reference_indexes.get(msg.base_root)
            if rix is not None and rix.root == msg.base_root:
                self._reference_map = ReferenceMap(rix)
        return []

    def _on_nodes_want(self, msg: HdeNodesWant) -> list[Action | EncodeChunk]:
        ix = self.index
        if not 1 <= msg.level <= ix.height:
            return self._fail(f"hde.nodes_want: level {msg.level} outside 1..{ix.height}")
        parts = []
        for parent in msg.parents:
            if parent >= ix.level_size(msg.level):
                return self._fail(f"hde.nodes_want: no node {parent} at level {msg.level}")
            parts.append(ix.children(msg.level, parent)[1])
        reply = HdeNodes(transfer=self.transfer, level=msg.level, parents=msg.parents,
                         digests=b"".join(parts))
        return [Send(self.peer, reply)]

    def _on_groups_want(self, msg: HdeGroupsWant) -> list[Action | EncodeChunk]:
        ix = self.index
        if any(b >= ix.block_count for b in msg.blocks):
            return self._fail(f"hde.groups_want: a block beyond {ix.block_count}")
        reply = HdeGroups(transfer=self.transfer, blocks=msg.blocks,
                          digests=b"".join(ix.node(0, b) for b in msg.blocks),
                          groups=b"".join(ix.groups(b) for b in msg.blocks))
        return [Send(self.peer, reply)]

    def _on_fps_want(self, msg: HdeFingerprintsWant) -> list[Action | EncodeChunk]:
        ix = self.index
        digests: list[bytes] = []
        groups: list[range] = []
        for b, mask in zip(msg.blocks, msg.masks, strict=True):
            if b >= ix.block_count:
                return self._fail(f"hde.fps_want: no block {b}")
            if msg.digests:
                digests.append(ix.node(0, b))
            pages = ix.block_pages(b)
            for g, start in enumerate(range(pages.start, pages.stop, GROUP_PAGES)):
                if mask >> g & 1:
                    groups.append(range(start, min(start + GROUP_PAGES, pages.stop)))
            if mask >> -(-len(pages) // GROUP_PAGES):
                return self._fail(f"hde.fps_want: mask {mask:#x} names groups past block {b}")
        ref = None if msg.plain else self._reference_map
        reply = HdeFingerprints(transfer=self.transfer, blocks=msg.blocks,
                                digests=b"".join(digests),
                                fps=compress(encode_entries(ix, groups, ref), FP_LEVEL))
        return [Send(self.peer, reply)]

    def _on_want(self, msg: HdeWant) -> list[Action | EncodeChunk]:
        """Cut the wanted ranges into chunks of ``CHUNK_PAGES`` without listing pages."""
        n = self.index.page_count
        check_ranges(msg.ranges, n, "hde.want", n)
        if self._similar is not None:
            return self._on_want_grouped(msg)
        out: list[Action | EncodeChunk] = []
        r = msg.ranges
        for i in range(0, len(r), 2):
            start, count = r[i], r[i + 1]
            while count:
                take = min(count, CHUNK_PAGES - self._pending_count)
                self._pending.append((start, take))
                self._pending_count += take
                start, count = start + take, count - take
                if self._pending_count == CHUNK_PAGES:
                    out.append(self._plan())
        if msg.flush and self._pending_count:
            out.append(self._plan())
        return out

    def _on_want_grouped(self, msg: HdeWant) -> list[Action | EncodeChunk]:
        """Plan the first LEAD_PAGES wanted pages as they come, then gather wants until a
        window is full (or the target flushes) and plan it."""
        r = msg.ranges
        lead: list[int] = []
        for i in range(0, len(r), 2):
            start, count = r[i], r[i + 1]
            take = min(count, LEAD_PAGES - self._lead)
            if take > 0:
                lead.extend(range(start, start + take))
                self._lead += take
                start, count = start + take, count - take
            if count:
                self._pending.append((start, count))
                self._pending_count += count
        out = self._plan_grouped(lead)
        if self._pending_count < GROUP_WINDOW and not (msg.flush and self._pending_count):
            return out
        pieces, self._pending, self._pending_count = self._pending, [], 0
        return out + self._plan_grouped([p for s, c in pieces for p in range(s, s + c)])

    def _plan_grouped(self, wanted: list[int]) -> list[Action | EncodeChunk]:
        assert self._similar is not None
        pages = list(dict.fromkeys(wanted))
        out: list[Action | EncodeChunk] = []
        for chunk in group_chunks(pages, self._similar):
            plan = ChunkPlan.of_pages(len(self._plans), chunk)
            self._plans[plan.chunk_id] = plan
            out.append(EncodeChunk(self.transfer, plan, self.reference_root))
        return out

    def _plan(self) -> EncodeChunk:
        pieces, self._pending, self._pending_count = self._pending, [], 0
        cid = len(self._plans)
        ordered = all(pieces[i][0] >= pieces[i - 1][0] + pieces[i - 1][1]
                      for i in range(1, len(pieces)))
        if ordered:
            plan = ChunkPlan(cid, tuple(x for piece in pieces for x in piece))
        else:  # wants from different messages interleave (a re-fetch): at most 256 pages
            plan = ChunkPlan.of_pages(cid, (p for s, c in pieces for p in range(s, s + c)))
        self._plans[cid] = plan
        return EncodeChunk(self.transfer, plan, self.reference_root)

    def _on_resend(self, msg: HdeResend) -> list[Action | EncodeChunk]:
        out: list[Action | EncodeChunk] = []
        for cid in msg.chunk_ids:
            plan = self._plans.get(cid)
            if plan is None:
                return self._fail(f"hde.resend: chunk {cid} was never sent")
            self._resends[cid] = self._resends.get(cid, 0) + 1
            if self._resends[cid] > MAX_RESENDS:
                return self._fail(f"chunk {cid} asked for more than {MAX_RESENDS} times")
            out.append(EncodeChunk(self.transfer, plan, self.reference_root))
        return out

