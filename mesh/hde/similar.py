"""Which pages to put in one chunk: equal pages, and pages that are shifted copies.

A chunk is compressed on its own (zstd over at most 1 MiB, :mod:`mesh.hde.codec`), so
zstd finds a repeat only inside one chunk. Pages in ascending order put a page and its
near-copy in one chunk only when they happen to be neighbours; in guest memory they
rarely are (a file's pages and a copy of it, at a few bytes' offset, in another buffer).

:func:`sketch` names a page by its content, not its position: the smallest XXH64 of the
16 bytes after each newline or zero byte (content-defined anchors, as similarity
detection in deduplicating stores does), skipping windows that hold a zero byte (runs
of zeros would make every sparse page look alike). Only anchors in the page's first
:data:`SKETCH_SPAN` bytes count. A copy of a page shifted by a few bytes keeps almost all
its anchors, so it keeps its sketch; unrelated pages share one rarely.
:func:`group_chunks` then cuts pages into chunks with equal keys together.

Measured offline on the bench-live guest (256 MiB, ``dwcp.fill=60``, RAM at 20 s of
guest time; docs/BENCHMARKS.md, issue 17 "ratios"): the 36,185 distinct non-uniform
pages in chunks at zstd 9 took 83,913,789 bytes in ascending order, 74,641,960
(-11.0 %) grouped by a sketch of the whole page over the whole image (82,257,155 with
groups of 16,384 pages only, 83,492,172 of 4,096: the copies lie far apart), about what
one zstd stream with long-distance matching over the whole image gives (74,175,944);
the HDE transfer with the 1 KiB sketch: 84,294,861 -> 75,512,579 wire bytes, 3.62 ->
3.34 CPU s (grouped chunks compress faster). At zstd 1 the gain is 2 %: its window and
match finder miss most of the copies. The sketch costs ~0.4 CPU s per 148 MB of pages.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Hashable, Sequence

import xxhash

from mesh.hde.image import PageSource
from mesh.hde.messages import CHUNK_PAGES

__all__ = ["sketch", "page_sketches", "similar_at", "group_chunks", "SketchAhead",
           "SKETCH_BYTES", "SKETCH_SPAN", "SIMILAR_FROM_LEVEL", "LEAD_PAGES"]

#: Bytes after an anchor that make one feature.
SKETCH_BYTES = 16
#: Anchors are looked for in the page's first this many bytes: a copy shifted by a few
#: bytes keeps them. Measured on the bench guest at level 6: the whole page 1.42 CPU s,
#: -11.4 %; the first 1 KiB 0.40 CPU s, -10.8 %; 512 bytes 0.22 s, -10.6 %.
SKETCH_SPAN = 1024
#: From this zstd level up, a transfer chunks pages by similarity (:func:`similar_at`):
#: 10-11 % fewer bytes on the bench guest at levels 6 and 9, 0.3 % on the corpus guest,
#: for ~0.4 CPU s per 148 MB of pages. A level this high is chosen only where the link,
#: not the CPU, bounds the transfer (mesh.hde.level); at level 1 the same grouping gains 2 %.
SIMILAR_FROM_LEVEL = 6
#: A source chunking by similarity plans the first this many wanted pages of a transfer
#: as their wants come (grouped within each want), before its window
#: (mesh.hde.source.GROUP_WINDOW) fills: the link starts with
#: the diff's first want instead of its last. On a cold target the window is the whole
#: image, so nothing was planned until the target's walk over every block ended (the
#: first chunk 1.04 s after the target's word on the quiet bench guest over 100 Mbit/s,
#: issue 17). 4,096 pages (16 MiB, ~8 MB at levels 9-12: ~0.65 s of a 100 Mbit/s link)
#: cover most of that walk; they are ~11 % of the bench guest's 36,185 wanted pages, so
#: at most ~1 % of the grouping's 11 % gain is given up (twice the lead would cover the
#: whole walk for up to ~2.5 %: not measured, a quiet run's `first_chunk_s` and
#: `starved_s` against `cold_bytes_ratio` decide).
LEAD_PAGES = 4096
_FEATURE = re.compile(rb"[\n\x00]([^\x00]{%d})" % SKETCH_BYTES, re.S)


def sketch(page: bytes | memoryview) -> int | None:
    """The page's similarity key, or None when it has no anchor (module doc)."""
    found = _FEATURE.findall(page, 0, SKETCH_SPAN)
    return min(map(xxhash.xxh64_intdigest, found)) if found else None


def page_sketches(image: PageSource) -> Callable[[int], int | None]:
    """``page -> sketch`` over ``image``, for :class:`mesh.hde.source.HdeSource`."""
    return lambda p: sketch(image.view(p))


def similar_at(image: PageSource, level: int) -> Callable[[int], int | None] | None:
    """The ``similar`` of an :class:`mesh.hde.source.HdeSource` sending ``image`` at zstd
    ``level``: its page sketches from :data:`SIMILAR_FROM_LEVEL` up, else None (pages
    in ascending order). Every sender of HDE transfers (the node's v3 rounds, the
    in-process live migration) decides it here."""
    return page_sketches(image) if level >= SIMILAR_FROM_LEVEL else None


def group_chunks(pages: Sequence[int],
                 key: Callable[[int], Hashable | None]) -> list[list[int]]:
    """``pages`` cut into chunks of up to ``CHUNK_PAGES``, pages with the same key (not
    None) in one chunk where the group fits (a larger group fills whole chunks), groups
    in the order of their first page, each chunk ascending."""
    groups: dict[Hashable, list[int]] = {}
    for p in pages:
        k = key(p)
        groups.setdefault(("page", p) if k is None else ("key", k), []).append(p)
    chunks: list[list[int]] = []
    cur: list[int] = []
    for group in groups.values():
        if cur and len(cur) + len(group) > CHUNK_PAGES:
            chunks.append(cur)
            cur = []
        while len(group) > CHUNK_PAGES:
            chunks.append(group[:CHUNK_PAGES])
            group = group[CHUNK_PAGES:]
        cur += group
    if cur:
        chunks.append(cur)
    return [sorted(c) for c in chunks]


class SketchAhead:
    """``page -> sketch`` over ``image`` (as :func:`page_sketches`), with the sketches of
    the pages the target wants computed ahead, while the diff still runs.

    A source that chunks by similarity gathers a whole window of wants before it plans
    (:data:`mesh.hde.source.GROUP_WINDOW`), then sketches every page of it: on a cold
    target that is every page of a 256 MiB guest, ~0.4 CPU s on an idle core and 1.9 s
    wall under load 15 (the bench guest's 36,185 pages, issue 17 task livetbf) during
    which the link carries nothing. Here the driver passes each want's ranges as it
    arrives (:meth:`want`) and a worker thread (:meth:`run`) sketches them meanwhile;
    when the window is planned, a page sketched ahead costs a lookup and one not yet
    reached is sketched on the spot, as before. The keys are the same either way, so
    the chunks are too. Sans-I/O apart from the thread the driver lends :meth:`run`."""

    def __init__(self, image: PageSource) -> None:
        self._image = image
        self._keys: dict[int, int | None] = {}
        self._todo: queue.SimpleQueue[tuple[int, ...] | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._wanted = 0
        #: pages sketched by :meth:`run` ahead of their plan, and on the spot
        self.ahead = 0
        self.on_the_spot = 0

    def want(self, ranges: Sequence[int]) -> None:
        """The target wants ``ranges`` (start, count, start, count, ...). The transfer's
        first :data:`LEAD_PAGES` wanted pages are not sketched ahead: the source plans
        them as their want comes (sketching them there), so they would be sketched twice."""
        out: list[int] = []
        for i in range(0, len(ranges), 2):
            start, count = ranges[i], ranges[i + 1]
            skip = min(count, max(0, LEAD_PAGES - self._wanted))
            self._wanted += count
            if count > skip:
                out += (start + skip, count - skip)
        if out:
            self._todo.put(tuple(out))

    def close(self) -> None:
        """:meth:`run` returns at its next page (the diff ended: every want is planned
        as it comes from here on; or the round ended or was cancelled)."""
        self._closed.set()
        self._todo.put(None)

    def run(self) -> None:
        """Worker thread: sketch the wanted pages in the order they were wanted, until
        :meth:`close`."""
        keys = self._keys
        while not self._closed.is_set():
            ranges = self._todo.get()
            if ranges is None:
                return
            for i in range(0, len(ranges), 2):
                for p in range(ranges[i], ranges[i] + ranges[i + 1]):
                    if self._closed.is_set():
                        return
                    if p not in keys:
                        keys[p] = sketch(self._image.view(p))
                        self.ahead += 1

    def __call__(self, page: int) -> int | None:
        try:
            return self._keys[page]
        except KeyError:
            self.on_the_spot += 1
            k = self._keys[page] = sketch(self._image.view(page))
            return k
