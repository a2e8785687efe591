"""Roots of a migrating VM's images kept current by refreshing what changed, so nothing
between a guest's ``stop`` and its ``cont`` hashes the whole image (DESIGN.md, "VM
backends"; docs/qemu.md, "Downtime").

- :class:`LiveIndex`, at a source whose backend finds dirty pages by content (qemu): a
  :class:`~mesh.hde.index.PageIndex` of the live images, built during pre-copy and caught
  up after every round and at the fence. Catching up scans each page's fingerprint
  against the index (the one pass over RAM a kernel without soft-dirty bits leaves, at
  memory speed) and re-indexes only the blocks that changed, each from one snapshot of
  its bytes: a block's page fingerprints and its digest are of the same bytes even while
  the guest writes, so a page that changed and changed back (A, B, A) can never leave an
  index whose fingerprints say A and whose block digest says B.
- :class:`IncomingIndexes`, at a target: the index of each incoming image refreshed over
  the pages the migration wrote since (:attr:`mesh.hde.image.ImageWriter.written`).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor

import xxhash

from federation.vms.backend import combined_root
from federation.vms.dirty_scan import DIGEST, GROUP_PAGES, changed_pages, group_digests
from mesh.hde.image import FP_SIZE, PAGE_SIZE, ImageWriter, PageSource
from mesh.hde.index import BLOCK_PAGES, PageIndex, block_digest, build_index

__all__ = ["LiveIndex", "IncomingIndexes", "snapshot_index"]

_xxh = xxhash.xxh3_128_digest
_xxh64 = xxhash.xxh3_64_digest


class _Snapshots:
    """A page source over copies of some blocks of an image (what refresh reads)."""

    def __init__(self, page_count: int, blocks: dict[int, bytes]) -> None:
        self.page_count = page_count
        self.nbytes = page_count * PAGE_SIZE
        self.blocks = blocks

    def view(self, page: int, count: int = 1) -> memoryview:
        b = page // BLOCK_PAGES
        off = (page - b * BLOCK_PAGES) * PAGE_SIZE
        return memoryview(self.blocks[b])[off : off + count * PAGE_SIZE]


def _block(image: PageSource, b: int) -> bytes:
    first = b * BLOCK_PAGES
    return bytes(image.view(first, min(BLOCK_PAGES, image.page_count - first)))


def _snapshot_index(image: PageSource) -> tuple[PageIndex, bytearray]:
    """The index and the group digests of an image that may change meanwhile, each block's
    from one copy of it."""
    nblocks = -(-image.page_count // BLOCK_PAGES)
    fps = bytearray(image.page_count * FP_SIZE)
    digests = bytearray()
    groups = bytearray()
    step = GROUP_PAGES * PAGE_SIZE
    for b in range(nblocks):
        snap = _block(image, b)
        first = b * BLOCK_PAGES
        for i in range(len(snap) // PAGE_SIZE):
            fps[(first + i) * FP_SIZE : (first + i + 1) * FP_SIZE] = _xxh(
                snap[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        digests += block_digest(snap)
        groups += b"".join(_xxh64(snap[o : o + step]) for o in range(0, len(snap), step))
    return PageIndex(image.page_count, fps, digests), groups


def snapshot_index(image: PageSource) -> PageIndex:
    """The index of an image that may change meanwhile, each block from one copy of it."""
    return _snapshot_index(image)[0]


class LiveIndex:
    """The index of a live image, caught up by :meth:`catch_up` (see module doc). Beside
    it, an XXH3-64 digest per group of :data:`federation.vms.dirty_scan.GROUP_PAGES`
    pages of the same snapshots: the scan compares groups at memory speed, then the pages
    of the groups that differ against the index's own fingerprints."""

    def __init__(self, image: PageSource) -> None:
        self.index, self.groups = _snapshot_index(image)
        #: blocks the last catch_up re-hashed (what it cost: 1 MiB of SHA-256 each)
        self.rehashed = 0

    @classmethod
    def of(cls, index: PageIndex, groups: bytes | bytearray) -> LiveIndex:
        """The live index of an image whose copy ``index`` and 16 KiB ``groups`` digests
        describe (a v3 source's shadow after round 1: no second pass over RAM to build
        it); the first :meth:`catch_up` then finds what changed since the copy."""
        if len(groups) != -(-index.page_count // GROUP_PAGES) * DIGEST:
            raise ValueError(f"{len(groups)} bytes of group digests for "
                             f"{index.page_count} pages")
        obj = cls.__new__(cls)
        obj.index, obj.groups, obj.rehashed = index.copy(), bytearray(groups), 0
        return obj

    def changed(self, image: PageSource) -> list[int]:
        """Pages whose content differs from their fingerprint in the index."""
        return self._scan(image)[0]

    def _scan(self, image: PageSource) -> tuple[list[int], bytes, list[int]]:
        """(the pages that differ from the index, the scan's group digests, the groups
        whose digest differs from the one held)."""
        fps = memoryview(self.index.fps)
        out = []
        digests = group_digests(image)
        groups = changed_pages(bytes(self.groups), digests)
        for g in groups:
            first = g * GROUP_PAGES
            for p in range(first, min(first + GROUP_PAGES, image.page_count)):
                if _xxh(image.view(p)) != fps[p * FP_SIZE : (p + 1) * FP_SIZE]:
                    out.append(p)
        return out, digests, groups

    def catch_up(self, image: PageSource, executor: Executor | None = None,
                 stopped: bool = False) -> int:
        """Re-index the blocks with changed pages from one snapshot each (``stopped``: the
        guest writes nothing, so from the image itself, no copy); the number of pages that
        had changed."""
        changed, digests, groups = self._scan(image)
        blocks = sorted({p // BLOCK_PAGES for p in changed})
        self.rehashed = len(blocks)
        if stopped:
            # the image holds still: the scan's group digests are of the bytes indexed now,
            # and its changed pages are every page whose fingerprint moves (no second pass
            # over the changed blocks' groups in the stop window)
            for g in groups:
                self.groups[g * DIGEST : (g + 1) * DIGEST] = digests[g * DIGEST :
                                                                     (g + 1) * DIGEST]
            if blocks:
                self.index.refresh(image, [*changed, *(b * BLOCK_PAGES for b in blocks)],
                                   executor)
            return len(changed)
        if blocks:
            snaps = _Snapshots(image.page_count, {b: _block(image, b) for b in blocks})
            # Within each snapshot, the groups whose digest differs from the one held get
            # new page fingerprints; a group whose digest is the same holds the bytes its
            # fingerprints describe. Then the block's digest is of the same snapshot.
            pages: list[int] = []
            for b in blocks:
                first_group = b * BLOCK_PAGES // GROUP_PAGES
                end = min((b + 1) * BLOCK_PAGES, image.page_count)
                for g in range(first_group, -(-end // GROUP_PAGES)):
                    first = g * GROUP_PAGES
                    n = min(GROUP_PAGES, image.page_count - first)
                    digest = _xxh64(snaps.view(first, n))
                    if digest != self.groups[g * DIGEST : (g + 1) * DIGEST]:
                        self.groups[g * DIGEST : (g + 1) * DIGEST] = digest
                        pages.extend(range(first, first + n))
            # a block can differ only through a group (2^-64 odds aside); its first page
            # keeps it in the refresh either way, so its digest is recomputed
            pages.extend(b * BLOCK_PAGES for b in blocks)
            self.index.refresh(snaps, pages, executor)
        return len(changed)


class IncomingIndexes:
    """A target's index of each incoming image of one migration, refreshed over the pages
    written since it was last asked for (only this migration writes the images)."""

    def __init__(self, executor: Executor | None = None) -> None:
        self.executor = executor
        self.indexes: dict[str, PageIndex] = {}

    def index(self, name: str, writer: ImageWriter) -> PageIndex:
        """The current index of incoming image ``name``. It is a new object each time it
        changed: an index handed out earlier (a round's base) stays as it was."""
        held = self.indexes.get(name)
        if held is None or getattr(writer, "written", None) is None:
            writer.written = set()
            ix = build_index(writer, self.executor)
        elif not writer.written:
            return held
        else:
            pages, writer.written = writer.written, set()
            ix = held.copy()
            ix.refresh(writer, pages, self.executor)
        self.indexes[name] = ix
        return ix

    def root(self, writers: Mapping[str, ImageWriter]) -> bytes:
        return combined_root({n: self.index(n, w).root for n, w in writers.items()})
