"""The page entries of an ``hde.fps`` reply: how the source names each page it lists.

Each listed page goes as one of:

- ``KEY``: its 8-byte key (:data:`mesh.hde.image.KEY_SIZE`); the target resolves
  it (uniform page, its base, pages received, its store, or it asks for it).
- ``BASE q``: "equal to page ``q`` of your base", a zigzag varint of ``q - p``
  (one byte when ``q == p``): a page copied from elsewhere in the old image,
  which page cache and heap copies make common.
- ``RUN``: "equal to the base page after the one the previous entry named":
  copies come in runs of consecutive pages (measured on the corpus: 11,135 of
  the 14,990 copied pages of a 1 GiB guest between t0 and t0+60 s continue their
  left neighbour's run), so a run costs one ``BASE`` entry and a tag per page.

The source names base pages only when the target's base is a copy the source
holds with its index (the same root), and only after comparing the full 128-bit
fingerprints, so an entry is as exact as a key would be; the target's block
digests check the assembled image either way. Layout, zstd-compressed as a
whole: one tag byte per page, then the keys and varints in page order. A reply
without a reference is all ``KEY`` tags, which compress to a few bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mesh.hde.codec import ChunkError, read_varint, varints
from mesh.hde.image import FP_SIZE, KEY_SIZE, UNIFORM_KEY
from mesh.hde.index import PageIndex

__all__ = ["KEY", "BASE", "RUN", "ReferenceMap", "encode_entries", "iter_entries"]

KEY, BASE, RUN = 0, 1, 2


class ReferenceMap:
    """A reference image's index and, built on first use, its first page per key.

    Memory: a dict entry per distinct non-uniform page of the reference (~100 bytes,
    as the target's :class:`~mesh.hde.store.PageStore` pays for the same image; zero
    pages, 79 % of the corpus guest's RAM, cost nothing)."""

    def __init__(self, index: PageIndex) -> None:
        self.index = index
        self._first: dict[bytes, int] | None = None

    def position(self, fp: bytes) -> int | None:
        """A page of the reference whose full fingerprint is ``fp``."""
        if self._first is None:
            first: dict[bytes, int] = {}
            keys = self.index.keys(0, self.index.page_count)
            for page in range(self.index.page_count):
                key = keys[page * KEY_SIZE : (page + 1) * KEY_SIZE]
                if key not in UNIFORM_KEY:
                    first.setdefault(key, page)
            self._first = first
        q = self._first.get(fp[:KEY_SIZE])
        return q if q is not None and self.index.fp(q) == fp else None


def encode_entries(index: PageIndex, groups: Sequence[range], ref: ReferenceMap | None) -> bytes:
    """The entries (uncompressed) of the pages of ``groups``, in order."""
    if ref is None:
        count = sum(len(r) for r in groups)
        return bytes(count) + b"".join(index.keys(r.start, r.stop) for r in groups)
    rfps, rcount = ref.index.fps, ref.index.page_count
    tags = bytearray()
    data: list[bytes] = []
    origin: int | None = None
    for r in groups:
        for p in r:
            fp = index.fp(p)
            nxt = -1 if origin is None else origin + 1
            if 0 <= nxt < rcount and rfps[nxt * FP_SIZE : (nxt + 1) * FP_SIZE] == fp:
                tags.append(RUN)
                origin = nxt
                continue
            q: int | None = p
            if p >= rcount or rfps[p * FP_SIZE : (p + 1) * FP_SIZE] != fp:
                q = ref.position(fp)
            if q is None:
                tags.append(KEY)
                data.append(fp[:KEY_SIZE])
            else:
                tags.append(BASE)
                d = q - p
                data.append(varints([d * 2 if d >= 0 else -d * 2 - 1]))
            origin = q
    return bytes(tags) + b"".join(data)


def iter_entries(data: bytes, pages: Sequence[int], base_pages: int | None,
                 ) -> Iterator[tuple[int, bytes | None, int | None]]:  # fmt: skip
    """``(page, key, None)`` or ``(page, None, base page)`` per page of ``pages`` from the
    entries ``data``; raises :class:`ChunkError` on anything malformed, or on a base page
    when the target has no base (``base_pages`` None) or past its ``base_pages``."""
    n = len(pages)
    if len(data) < n:
        raise ChunkError("hde.fps: fewer entry tags than pages")
    mv = memoryview(data)
    pos = n
    origin: int | None = None
    for i, p in enumerate(pages):
        tag = data[i]
        if tag == KEY:
            if pos + KEY_SIZE > len(data):
                raise ChunkError("hde.fps: entries end inside a key")
            yield p, bytes(mv[pos : pos + KEY_SIZE]), None
            pos += KEY_SIZE
            origin = None
            continue
        if tag == BASE:
            z, pos = read_varint(mv, pos, "hde.fps entry")
            q = p + (z >> 1 if not z & 1 else -(z >> 1) - 1)
        elif tag == RUN:
            if origin is None:
                raise ChunkError(f"hde.fps: page {p} continues a run that was not started")
            q = origin + 1
        else:
            raise ChunkError(f"hde.fps: unknown entry tag {tag}")
        if base_pages is None or not 0 <= q < base_pages:
            raise ChunkError(f"hde.fps: page {p} names base page {q}, which the target lacks")
        yield p, None, q
        origin = q
    if pos != len(data):
        raise ChunkError("hde.fps: bytes left after the last entry")
