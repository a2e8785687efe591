"""The page index of an image: a fingerprint per page and a Merkle tree over the content.

Layout of the tree (fixed, so source and target agree on every position):

- level 0: one node per *block* of ``BLOCK_PAGES`` pages (1 MiB), the SHA-256
  of the block's bytes (domain-separated). These leaves are cryptographic over
  the content itself, so the root commits to every byte of the image.
- level k+1: BLAKE2b-256 over the concatenated digests of up to ``FANOUT``
  children at level k, until one node (the *top*) remains.
- root: BLAKE2b-256 over the page count and the top.

Memory: 16 bytes of fingerprint per page plus 32 bytes per 1 MiB block (and
the upper levels, 1/16 of that): 16.2 bytes per page. Time: one pass over the
image. Work is split in spans of blocks that run on an executor's threads:
XXH3 holds the GIL only briefly and SHA-256 over 1 MiB releases it, so two
threads index about twice as fast as one (see ``dwcp bench hde``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor

import xxhash

from mesh.hde.image import (
    FP_SIZE,
    KEY_SIZE,
    PAGE_SIZE,
    UNIFORM_FP,
    ZERO_FP,
    Image,
    PageSource,
    data_runs,
)

__all__ = [
    "IndexBuilder",
    "BLOCK_PAGES",
    "GROUP_PAGES",
    "GROUPS_PER_BLOCK",
    "GROUP_DIGEST_SIZE",
    "FANOUT",
    "DIGEST_SIZE",
    "PageIndex",
    "build_index",
    "zero_index",
    "block_digest",
    "zero_node",
    "ZERO_BLOCK_DIGEST",
    "node_digest",
    "root_digest",
    "level_sizes",
    "changed_pages",
]

#: 256 pages = 1 MiB per leaf: the chunk size DESIGN.md gives for payload, so a
#: leaf that differs costs one 4 KiB list of fingerprints to resolve.
BLOCK_PAGES = 256
#: Children per inner node. 16 keeps a node's reply small (512 bytes) and the
#: depth low: 5 round trips down to the blocks of a 100 GiB image.
FANOUT = 16
DIGEST_SIZE = 32
#: Pages per group inside a block. A block that differs from the base is resolved by
#: 16 group digests (64 B), then the page keys of the groups that differ (128 B
#: each): a block with one dirty page costs ~0.2 KiB of diff instead of 2 KiB.
GROUP_PAGES = 16
GROUPS_PER_BLOCK = BLOCK_PAGES // GROUP_PAGES
#: A group digest only decides whether to look closer: a wrong "equal" is caught by the
#: block's SHA-256 and costs that block re-sent. With 32 bits, a 1 TiB image (2**24
#: groups) compared group by group meets one with probability 2**-8, the bound
#: mesh.hde.image.KEY_SIZE accepts for page keys; 64 bits cost 8 KB more diff in the
#: corpus guest's t0 -> t0+60 s transfer (of 10.7 MB on the wire).
GROUP_DIGEST_SIZE = 4
#: Blocks indexed per executor task (16 MiB): large enough that task overhead
#: is noise, small enough that two threads stay busy to the end.
SPAN_BLOCKS = 16

_BLOCK_PREFIX = b"dwcp-hde-block\x00"
_ZERO_BLOCK = bytes(BLOCK_PAGES * PAGE_SIZE)
_xxh = xxhash.xxh3_128_digest
_xxh64 = xxhash.xxh3_64_digest
assert KEY_SIZE == 8 and FP_SIZE == 16, "keys() takes every other 8-byte word"


def block_digest(data: bytes | memoryview) -> bytes:
    """The level-0 digest of a block's content."""
    h = hashlib.sha256(_BLOCK_PREFIX)
    h.update(data)
    return h.digest()


_ZERO_BLOCK_DIGEST = ZERO_BLOCK_DIGEST = block_digest(_ZERO_BLOCK)
#: level -> the digest of a node whose every block is a full zero block
_ZERO_NODES: list[bytes] = [_ZERO_BLOCK_DIGEST]


def zero_node(level: int, index: int, page_count: int) -> bytes | None:
    """The digest node ``index`` at ``level`` of an image of ``page_count`` pages has when
    all its pages are zero, if it spans full blocks only (FANOUT**level of them); None for
    the last, partial node of a level (a target compares it the long way)."""
    span = FANOUT**level * BLOCK_PAGES
    if (index + 1) * span > page_count:
        return None
    while len(_ZERO_NODES) <= level:
        _ZERO_NODES.append(node_digest(_ZERO_NODES[-1] * FANOUT))
    return _ZERO_NODES[level]


def node_digest(children: bytes | memoryview) -> bytes:
    """An inner node: the digest over its children's digests."""
    return hashlib.blake2b(children, digest_size=DIGEST_SIZE, person=b"dwcp-hde-node").digest()


def root_digest(page_count: int, top: bytes) -> bytes:
    data = page_count.to_bytes(8, "big") + top
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=b"dwcp-hde-root").digest()


def level_sizes(page_count: int) -> list[int]:
    """Nodes per level, level 0 (blocks) first, ending with the single top node."""
    if page_count <= 0:
        raise ValueError("an image has at least one page")
    sizes = [-(-page_count // BLOCK_PAGES)]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // FANOUT))
    return sizes


class PageIndex:
    """Fingerprints, block digests and the tree of one image."""

    def __init__(self, page_count: int, fps: bytearray, blocks: bytearray) -> None:
        sizes = level_sizes(page_count)
        if len(fps) != page_count * FP_SIZE or len(blocks) != sizes[0] * DIGEST_SIZE:
            raise ValueError("fingerprint or block digest arrays do not match the page count")
        self.page_count = page_count
        self.fps = fps
        self.levels: list[bytes | bytearray] = [blocks]
        for n in sizes[1:]:
            below = memoryview(self.levels[-1])
            step = FANOUT * DIGEST_SIZE
            self.levels.append(
                b"".join(node_digest(below[i * step : (i + 1) * step]) for i in range(n))
            )
        self.top = bytes(self.levels[-1][:DIGEST_SIZE])
        self.root = root_digest(page_count, self.top)

    def copy(self) -> PageIndex:
        """An independent copy (a later :meth:`refresh` of either leaves the other as it
        was): what a round refreshes while the previous round's index stays its reference."""
        new = PageIndex.__new__(PageIndex)
        new.page_count = self.page_count
        new.fps = bytearray(self.fps)
        new.levels = [bytearray(level) for level in self.levels]
        new.top = self.top
        new.root = self.root
        return new

    def refresh(self, image: PageSource, pages: Iterable[int],
                executor: Executor | None = None) -> list[int]:
        """Bring the index up to ``image`` after ``pages`` (and only they) changed: their
        fingerprints, the digests of their blocks and the nodes above them, and the root.
        Costs the changed blocks plus one digest per inner node on their paths, never a
        pass over the image: verification after a pre-copy round or a final round is
        incremental (DESIGN.md, "VM backends"). Block digests run on ``executor``'s
        threads when given (SHA-256 over 1 MiB releases the GIL). Returns the blocks
        recomputed, ascending."""
        if image.page_count != self.page_count:
            raise ValueError(f"image has {image.page_count} pages, the index {self.page_count}")
        pages = sorted(set(pages))
        blocks = sorted({p // BLOCK_PAGES for p in pages})
        for p in pages:
            self.fps[p * FP_SIZE : (p + 1) * FP_SIZE] = _xxh(image.view(p))
        level0 = self.levels[0]
        if not isinstance(level0, bytearray):
            level0 = self.levels[0] = bytearray(level0)

        def digest(b: int) -> bytes:
            span = self.block_pages(b)
            return block_digest(image.view(span.start, len(span)))

        digests = (executor.map(digest, blocks) if executor is not None and len(blocks) > 1
                   else map(digest, blocks))
        for b, d in zip(blocks, digests, strict=True):
            level0[b * DIGEST_SIZE : (b + 1) * DIGEST_SIZE] = d
        changed = blocks
        step = FANOUT * DIGEST_SIZE
        for level in range(1, len(self.levels)):
            below = memoryview(self.levels[level - 1])
            nodes = bytearray(self.levels[level])
            changed = sorted({i // FANOUT for i in changed})
            for i in changed:
                nodes[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = node_digest(
                    below[i * step : (i + 1) * step])
            below.release()
            self.levels[level] = nodes
        self.top = bytes(self.levels[-1][:DIGEST_SIZE])
        self.root = root_digest(self.page_count, self.top)
        return blocks

    @property
    def height(self) -> int:
        """The level of the top node."""
        return len(self.levels) - 1

    @property
    def block_count(self) -> int:
        return len(self.levels[0]) // DIGEST_SIZE

    def fp(self, page: int) -> bytes:
        return bytes(self.fps[page * FP_SIZE : (page + 1) * FP_SIZE])

    def node(self, level: int, i: int) -> bytes:
        return bytes(self.levels[level][i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    def level_size(self, level: int) -> int:
        return len(self.levels[level]) // DIGEST_SIZE

    def children(self, level: int, parent: int) -> tuple[int, bytes]:
        """(first child index, concatenated digests) of ``parent`` at ``level`` (>= 1)."""
        first = parent * FANOUT
        last = min(first + FANOUT, self.level_size(level - 1))
        return first, bytes(self.levels[level - 1][first * DIGEST_SIZE : last * DIGEST_SIZE])

    def groups(self, block: int) -> bytes:
        """The digests of the page groups of ``block``: XXH3-64 over their fingerprints,
        cut to ``GROUP_DIGEST_SIZE`` bytes."""
        pages = self.block_pages(block)
        fps = memoryview(self.fps)
        return b"".join(
            _xxh64(fps[p * FP_SIZE : min(p + GROUP_PAGES, pages.stop) * FP_SIZE])[
                :GROUP_DIGEST_SIZE]
            for p in range(pages.start, pages.stop, GROUP_PAGES)
        )

    def keys(self, start: int, stop: int) -> bytes:
        """The keys (fingerprint prefixes) of pages ``start`` to ``stop``, concatenated."""
        # A key is the first of a fingerprint's two 8-byte words: a strided copy, no loop.
        return memoryview(self.fps)[start * FP_SIZE : stop * FP_SIZE].cast("Q")[::2].tobytes()

    def block_pages(self, block: int) -> range:
        return range(block * BLOCK_PAGES, min((block + 1) * BLOCK_PAGES, self.page_count))

    def iter_fps(self) -> Iterator[bytes]:
        mv = memoryview(self.fps)
        for i in range(0, len(mv), FP_SIZE):
            yield bytes(mv[i : i + FP_SIZE])

    def page_stats(self) -> dict[str, int]:
        """Zero, uniform (non-zero) and duplicate pages (repeats of an earlier page that is
        neither)."""
        zero = uniform = dup = 0
        seen: set[bytes] = set()
        for fp in self.iter_fps():
            if fp == ZERO_FP:
                zero += 1
            elif fp in UNIFORM_FP:
                uniform += 1
            elif fp in seen:
                dup += 1
            else:
                seen.add(fp)
        return {"pages": self.page_count, "zero": zero, "uniform": uniform, "duplicate": dup}


def _index_span(image: PageSource, first_block: int, nblocks: int) -> tuple[bytes, bytes]:
    """Fingerprints and block digests of ``nblocks`` blocks from ``first_block``."""
    first_page = first_block * BLOCK_PAGES
    npages = min(nblocks * BLOCK_PAGES, image.page_count - first_page)
    fps: list[bytes] = []
    digests: list[bytes] = []
    zero_fps = ZERO_FP * BLOCK_PAGES
    # Blocks with data (a sparse file's holes read as zeros: such a block is a zero block
    # without reading it, so a 512 GiB image with a few written regions is indexed in
    # time proportional to its data, not its size).
    filled = {q // BLOCK_PAGES for s, c in data_runs(image, first_page, npages)
              for q in range(s - s % BLOCK_PAGES, s + c, BLOCK_PAGES)}
    for b in range(0, npages, BLOCK_PAGES):
        n = min(BLOCK_PAGES, npages - b)
        if n == BLOCK_PAGES and (first_page + b) // BLOCK_PAGES not in filled:
            fps.append(zero_fps)
            digests.append(_ZERO_BLOCK_DIGEST)
            continue
        mv = image.view(first_page + b, n)
        # A zero block is common in guest RAM; a copy-and-compare runs at ~20 GB/s
        # (a memoryview comparison is 20x slower). The first 64 bytes decide most cases.
        if n == BLOCK_PAGES and not any(mv[:64]) and bytes(mv) == _ZERO_BLOCK:
            fps.append(zero_fps)
            digests.append(_ZERO_BLOCK_DIGEST)
            continue
        fps.extend(_xxh(mv[i : i + PAGE_SIZE]) for i in range(0, n * PAGE_SIZE, PAGE_SIZE))
        digests.append(block_digest(mv))
    return b"".join(fps), b"".join(digests)


def zero_index(page_count: int) -> PageIndex:
    """The index of an image of ``page_count`` zero pages, without reading one: what a
    new, empty image holds before anything is written to it."""
    fps = bytearray(ZERO_FP * page_count)
    nblocks = level_sizes(page_count)[0]
    blocks = bytearray(_ZERO_BLOCK_DIGEST * (page_count // BLOCK_PAGES))
    if len(blocks) < nblocks * DIGEST_SIZE:  # a last, partial block
        blocks += block_digest(bytes(page_count % BLOCK_PAGES * PAGE_SIZE))
    return PageIndex(page_count, fps, blocks)


def build_index(image: PageSource, executor: Executor | None = None, window: int = 4) -> PageIndex:
    """Index ``image``; with an executor, spans run on its threads, at most ``window``
    submitted at a time so memory stays bounded for any image size."""
    sizes = level_sizes(image.page_count)
    nblocks = sizes[0]
    fps = bytearray(image.page_count * FP_SIZE)
    blocks = bytearray(nblocks * DIGEST_SIZE)

    def store(first_block: int, result: tuple[bytes, bytes]) -> None:
        f, d = result
        p = first_block * BLOCK_PAGES * FP_SIZE
        fps[p : p + len(f)] = f
        blocks[first_block * DIGEST_SIZE : first_block * DIGEST_SIZE + len(d)] = d

    starts = range(0, nblocks, SPAN_BLOCKS)
    if executor is None:
        for s in starts:
            store(s, _index_span(image, s, SPAN_BLOCKS))
    else:
        pending = []
        for s in starts:
            pending.append((s, executor.submit(_index_span, image, s, SPAN_BLOCKS)))
            if len(pending) >= window:
                s0, fut = pending.pop(0)
                store(s0, fut.result())
        for s0, fut in pending:
            store(s0, fut.result())
    return PageIndex(image.page_count, fps, blocks)


class IndexBuilder:
    """The index of an image built from its pages as a copy passes over them: pieces of
    whole blocks, each indexed from the bytes copied, so the copy is not read back (a
    sealed copy would be decrypted again for it). ``add`` may run on several threads at
    once, for different pieces; :meth:`index` once every page was added."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self._fps = bytearray(page_count * FP_SIZE)
        self._blocks = bytearray(level_sizes(page_count)[0] * DIGEST_SIZE)
        self._pages = 0
        self._lock = threading.Lock()

    def add(self, first_page: int, data: bytes | bytearray | memoryview) -> None:
        """Index pages ``first_page``.. from ``data`` (whole blocks, or the image's end)."""
        piece = Image(data, "piece")
        end = first_page + piece.page_count
        if first_page % BLOCK_PAGES or end > self.page_count or (
                piece.page_count % BLOCK_PAGES and end != self.page_count):
            raise ValueError(f"pages {first_page}..{end} are not whole blocks of the image's "
                             f"{self.page_count} pages")
        fps, digests = _index_span(piece, 0, -(-piece.page_count // BLOCK_PAGES))
        self._fps[first_page * FP_SIZE : first_page * FP_SIZE + len(fps)] = fps
        b = first_page // BLOCK_PAGES * DIGEST_SIZE
        self._blocks[b : b + len(digests)] = digests
        with self._lock:
            self._pages += piece.page_count

    def index(self) -> PageIndex:
        if self._pages != self.page_count:
            raise ValueError(f"{self._pages} of {self.page_count} pages indexed")
        return PageIndex(self.page_count, self._fps, self._blocks)


#: Pages whose fingerprints :func:`changed_pages` compares at once before a run that
#: differs is halved.
CHANGED_RUN = 256


def changed_pages(old: bytes, new: bytes, page_count: int) -> list[int]:
    """Pages whose fingerprint differs between two fingerprint arrays of ``page_count``
    pages (ascending): equal runs are skipped in one compare (bytes slices compare by
    memcmp), a run that differs is halved until its pages are found, so a page written
    alone in its run costs 2 log2(CHANGED_RUN) compares, not CHANGED_RUN (this runs in a
    fenced guest's stop window: 1,000 scattered pages of 256 MiB took 94-206 ms page by
    page, 32-44 ms halved, under load)."""
    out: list[int] = []
    for first in range(0, page_count, CHANGED_RUN):
        spans = [(first, min(CHANGED_RUN, page_count - first))]
        while spans:
            p, n = spans.pop()
            if old[p * FP_SIZE : (p + n) * FP_SIZE] == new[p * FP_SIZE : (p + n) * FP_SIZE]:
                continue
            if n == 1:
                out.append(p)
                continue
            half = n // 2
            spans += [(p + half, n - half), (p, half)]  # the lower half next: ascending
    return out
