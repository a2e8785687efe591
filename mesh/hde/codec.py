"""Chunks of pages: pure functions that encode and decode them.

A chunk carries up to ``CHUNK_PAGES`` pages the target asked for. Each page
goes either as it is or XORed with the target's base page at the same
position (the source holds a copy of that base, named by its root): an
in-place write leaves most of a page's bytes unchanged, so the XOR is mostly
zeros and compresses to a few dozen bytes. The encoder XORs a page when that
leaves more zero bytes than the page has, then keeps the XOR variant only if
the whole chunk compresses smaller that way (above level 3, judged by a trial
at level 1). The chunk is compressed with zstd at the level the driver chose
(:mod:`mesh.hde.level`, :mod:`mesh.hde.compressors`; level 0 stores,
and a stored chunk never XORs: it would not be smaller), and stored raw when
compression would not shrink it.

With ``copies`` the encoder also sends each distinct page of a chunk once: a page equal
to an earlier page of the same chunk goes as a pair (page, earlier page) in the header
and takes no payload (flag ``_COPIES``). A live migration's pre-copy round sends what
changed since the last round, and on the bench guest 17-23 % of those pages are equal
to another page of the same round (data written through a buffer: the buffer's page
and the file's page both changed); ``federation.vms.live_migration`` groups equal pages
into one chunk and asks for copies, and so do the v3 data plane's pushed rounds
(federation.dataplane.v3_push) to a target whose data channels offer the capability
``mesh.versions.HDE_COPIES`` (older decoders refuse the flag). The HDE diff does not need
it (the target resolves such pages by key), so its chunks never carry the flag. A
decoder of this version reads both.

An XXH3-128 digest over the header and payload lets the target reject a
corrupted chunk before it decompresses a byte; decoding raises only
:class:`ChunkError`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable, Sequence

import attrs
import xxhash
import zstandard

from mesh.hde.compressors import compress
from mesh.hde.image import PAGE_SIZE, PageSource
from mesh.hde.messages import CHUNK_PAGES
from mesh.hde.similar import group_chunks

__all__ = [
    "ChunkError",
    "ChunkPlan",
    "DecodedChunk",
    "grouped_plans",
    "encode_chunk",
    "decode_chunk",
    "delta_body",
    "to_ranges",
    "from_ranges",
    "check_ranges",
    "pack_ranges",
    "unpack_ranges",
    "varints",
    "read_varint",
    "xor_pages",
    "compress",
]


class ChunkError(Exception):
    """A chunk frame that is malformed, corrupted or inconsistent with the transfer."""


@attrs.frozen
class ChunkPlan:
    """Which pages chunk ``chunk_id`` carries, as ascending flattened (start, count) pairs:
    a cold transfer's chunks are a few long runs, so a plan stays small whatever the image."""

    chunk_id: int
    ranges: tuple[int, ...]

    @classmethod
    def of_pages(cls, chunk_id: int, pages: Iterable[int]) -> ChunkPlan:
        return cls(chunk_id, tuple(to_ranges(sorted(set(pages)))))

    @property
    def count(self) -> int:
        return sum(self.ranges[1::2])

    @property
    def pages(self) -> list[int]:
        r = self.ranges
        return [p for i in range(0, len(r), 2) for p in range(r[i], r[i] + r[i + 1])]


@attrs.frozen
class DecodedChunk:
    chunk_id: int
    pages: tuple[int, ...]
    xor: tuple[bool, ...]
    data: bytes


def grouped_plans(image: PageSource, pages: Sequence[int], first_id: int = 0) -> list[ChunkPlan]:
    """``pages`` of ``image`` in chunks of up to ``CHUNK_PAGES``, pages with equal bytes in
    the same chunk (:func:`mesh.hde.similar.group_chunks`): with ``encode_chunk(...,
    copies=True)`` each distinct page of a chunk then goes once. Chunk ids count from
    ``first_id``."""
    chunks = group_chunks(pages, lambda p: xxhash.xxh3_128_digest(image.view(p)))
    return [ChunkPlan.of_pages(first_id + k, c) for k, c in enumerate(chunks)]


def to_ranges(pages: Iterable[int]) -> list[int]:
    """Ascending page numbers as flattened (start, count) pairs."""
    out: list[int] = []
    for p in pages:
        if out and out[-2] + out[-1] == p:
            out[-1] += 1
        else:
            out += (p, 1)
    return out


def check_ranges(ranges: Sequence[int], limit: int, what: str, max_pages: int) -> None:
    """Flattened (start, count) pairs must ascend without overlap, stay below page
    ``limit`` and cover at most ``max_pages`` pages; checked without listing pages."""
    if len(ranges) % 2:
        raise ChunkError(f"{what}: an odd number of range values")
    if sum(ranges[1::2]) > max_pages:
        raise ChunkError(f"{what}: ranges cover more than {max_pages} pages")
    nxt = 0
    for i in range(0, len(ranges), 2):
        start, count = ranges[i], ranges[i + 1]
        if count == 0 or start < nxt or start + count > limit:
            raise ChunkError(f"{what}: range ({start}, {count}) is empty, unordered or past "
                             f"page {limit}")
        nxt = start + count


def from_ranges(ranges: Sequence[int], limit: int, what: str, max_pages: int) -> list[int]:
    """Checked flattened (start, count) pairs as page numbers (checked before any
    expansion, so a hostile count allocates nothing)."""
    check_ranges(ranges, limit, what, max_pages)
    r = ranges
    return [p for i in range(0, len(r), 2) for p in range(r[i], r[i] + r[i + 1])]


def xor_pages(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(n, "little")


_local = threading.local()


#: Chunk frame layout (little-endian): magic, transfer, chunk id, flags, number of ranges;
#: then each range as two LEB128 varints, its gap from the previous range's end and its
#: count - 1; the XOR bitmap; the payload length; the 16-byte digest; the payload. Not
#: CBOR: cbor2 copies a 1 MiB payload at 0.4-1.5 GB/s, a tenth of memcpy, and chunks are
#: the bulk of every transfer. Varints, not (u64, u32) pairs: a warm transfer's wants are
#: scattered (1,114 ranges in 34 chunks for a 1 GiB guest's t0 -> t0+60 s), and its
#: ranges then take 3 bytes each instead of 12. With flag ``_COPIES`` the XOR bitmap is
#: followed by a varint count of copies and, per copy, two varints: the copy's index in
#: the chunk and the index of the earlier page it equals (ascending copies, each of a
#: page that is neither a copy nor XORed); the payload then holds only the other pages.
MAGIC = b"HDE\x02"
_HEAD = struct.Struct("<4sQQBH")
_LEN = struct.Struct("<I")
#: A varint of a u64 takes at most 10 bytes.
_VARINT_MAX = 10
DIGEST = 16
_COMPRESSED = 1
_COPIES = 2
#: Above this level the plain and XOR variants of a chunk are compared at level 1 and only
#: the smaller is compressed at the chosen level: at levels 13-19 (5-45 MB/s per core,
#: mesh.hde.compressors) a second full compression doubled a warm chunk's cost, while
#: level 1 (~450 MB/s) picked the same variant in every chunk of the corpus guest's
#: t0 -> t0+60 s transfer as levels 3, 9, 12 and 15-19 did. Up to level 3 both
#: variants run at the level itself: there a second pass is cheap.
TRIAL_ABOVE = 3


def varints(values: Iterable[int]) -> bytes:
    """Unsigned LEB128 varints, concatenated."""
    out = bytearray()
    for v in values:
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def read_varint(mv: memoryview, pos: int, what: str) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ``what`` names it in errors."""
    value = shift = 0
    for i in range(pos, min(pos + _VARINT_MAX, len(mv))):
        byte = mv[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 64:
                break
            return value, i + 1
        shift += 7
    raise ChunkError(f"{what}: a varint is truncated or too long")


def pack_ranges(ranges: Sequence[int]) -> bytes:
    """Ascending flattened (start, count) pairs as varints of (gap, count - 1)."""
    prev = 0
    vals: list[int] = []
    for i in range(0, len(ranges), 2):
        vals += (ranges[i] - prev, ranges[i + 1] - 1)
        prev = ranges[i] + ranges[i + 1]
    return varints(vals)


def unpack_ranges(mv: memoryview, pos: int, n: int, cid: int) -> tuple[list[int], int]:
    """``n`` ranges packed by :func:`pack_ranges` from ``pos``; the position after them."""
    out: list[int] = []
    prev = 0
    for _ in range(n):
        gap, pos = read_varint(mv, pos, f"chunk {cid} ranges")
        count, pos = read_varint(mv, pos, f"chunk {cid} ranges")
        out += (prev + gap, count + 1)
        prev += gap + count + 1
    return out, pos


def _digest(head: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    """XXH3-128 over the header and payload: detects corruption in transit (the channel
    authenticates peers; each page is checked against its key and each block
    against the cryptographic tree, so the chunk digest need not resist forgery)."""
    h = xxhash.xxh3_128()
    h.update(head)
    h.update(payload)
    return h.digest()


def _scratch() -> memoryview:
    """A chunk-sized buffer per thread, reused: a fresh 1 MiB allocation per chunk costs
    page faults that, measured here, doubled the time of gathering its pages."""
    buf: bytearray | None = getattr(_local, "scratch", None)
    if buf is None:
        buf = _local.scratch = bytearray(CHUNK_PAGES * PAGE_SIZE)
    return memoryview(buf)


def _gather_into(dst: memoryview, image: PageSource, ranges: Sequence[int]) -> int:
    off = 0
    for i in range(0, len(ranges), 2):
        src = image.view(ranges[i], ranges[i + 1])
        dst[off : off + len(src)] = src
        off += len(src)
    return off


def _delta(raw: memoryview, pages: Sequence[int], reference: PageSource,
           xor_bits: bytearray) -> bytes | None:
    """The chunk body with pages XORed against the reference where that leaves more zero
    bytes than the page has; None if no page gains."""
    parts: list[bytes | memoryview] = []
    for i, p in enumerate(pages):
        page = raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        if p < reference.page_count:
            x = xor_pages(page, reference.view(p))
            if x.count(0) > page.tobytes().count(0):
                xor_bits[i // 8] |= 1 << (i % 8)
                parts.append(x)
                continue
        parts.append(page)
    return b"".join(parts) if any(xor_bits) else None


def delta_body(image: PageSource, pages: Sequence[int], reference: PageSource) -> bytes:
    """``pages`` of ``image`` as the encoder's XOR variant would compress them (each page
    XORed against ``reference`` where that leaves more zero bytes): what a level is
    measured on for a transfer that has a base."""
    raw = memoryview(b"".join(image.view(p) for p in pages))
    body = _delta(raw, pages, reference, bytearray((len(pages) + 7) // 8))
    return bytes(raw) if body is None else body


def _copies(raw: memoryview, count: int) -> dict[int, int]:
    """Index -> index of the first earlier page with the same bytes, for pages of ``raw``."""
    first: dict[bytes, int] = {}
    out: dict[int, int] = {}
    for i in range(count):
        page = raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE].tobytes()
        j = first.setdefault(page, i)
        if j != i:
            out[i] = j
    return out


def encode_chunk(transfer: int, plan: ChunkPlan, image: PageSource,
                 reference: PageSource | None, level: int, *,
                 copies: bool = False) -> bytes | bytearray:
    """The frame of ``plan``'s pages from ``image``. With a ``reference`` (the source's copy
    of the target's base), pages may go XORed against it. Pages are copied once: into the
    frame itself when stored, into a per-thread buffer when compressed. With ``copies``, a
    page equal to an earlier page of the chunk is named instead of sent (module doc)."""
    if not 0 < plan.count <= CHUNK_PAGES:
        raise ChunkError(f"chunk {plan.chunk_id}: {plan.count} pages, expected 1..{CHUNK_PAGES}")
    if copies:
        raw = _scratch()[: plan.count * PAGE_SIZE]
        _gather_into(raw, image, plan.ranges)
        dup = _copies(raw, plan.count)
        if dup and reference is not None and level != 0:
            # a page whose XOR against the target's page pays goes XORed, as without
            # copies, and so do its equals: a copy must equal its page as it arrives
            pages = plan.pages
            xored = {j for j in set(dup.values()) if pages[j] < reference.page_count
                     and _xor_pays(raw[j * PAGE_SIZE : (j + 1) * PAGE_SIZE],
                                   reference.view(pages[j]))}
            dup = {i: j for i, j in dup.items() if j not in xored}
        if dup:
            return _encode_with_copies(transfer, plan, image, reference, level, raw, dup)
    return _encode(transfer, plan, image, reference, level)


def _xor_pays(page: memoryview, ref: bytes | memoryview) -> bool:
    """The encoder's rule: XOR a page when that leaves more zero bytes than it has."""
    return xor_pages(page, ref).count(0) > page.tobytes().count(0)


def _encode_with_copies(transfer: int, plan: ChunkPlan, image: PageSource,
                        reference: PageSource | None, level: int, raw: memoryview,
                        dup: dict[int, int]) -> bytes | bytearray:
    """The frame of a chunk some of whose pages equal earlier ones (``dup``: index ->
    earlier index): the other pages go as :func:`_encode` sends pages, except that a page
    others copy is never XORed (its copies must equal its bytes as they arrive)."""
    pages = plan.pages
    kept = [i for i in range(len(pages)) if i not in dup]
    copied = set(dup.values())
    body = b"".join(raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in kept)
    xor_bits = bytearray((len(pages) + 7) // 8)
    if reference is not None and level != 0:
        parts: list[bytes] = []
        for i in kept:
            page = body[len(parts) * PAGE_SIZE : (len(parts) + 1) * PAGE_SIZE]
            p = pages[i]
            if i not in copied and p < reference.page_count:
                x = xor_pages(page, reference.view(p))
                if x.count(0) > page.count(0):
                    xor_bits[i // 8] |= 1 << (i % 8)
                    parts.append(x)
                    continue
            parts.append(page)
        delta = b"".join(parts)
        if any(xor_bits):
            trial = 1 if level > TRIAL_ABOVE else level
            if len(compress(delta, trial)) < len(compress(body, trial)):
                body = delta
            else:
                xor_bits = bytearray(len(xor_bits))
    payload, flags = body, _COPIES
    if level != 0:
        packed = compress(body, level)
        if len(packed) < len(body):
            payload, flags = packed, _COPIES | _COMPRESSED
        elif any(xor_bits):  # stored: the XOR variant is no smaller, send the pages
            payload = b"".join(raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in kept)
            xor_bits = bytearray(len(xor_bits))
    pairs = [v for i in sorted(dup) for v in (i, dup[i])]
    head = b"".join([
        _HEAD.pack(MAGIC, transfer, plan.chunk_id, flags, len(plan.ranges) // 2),
        pack_ranges(plan.ranges),
        xor_bits,
        varints([len(dup), *pairs]),
        _LEN.pack(len(payload)),
    ])
    return b"".join([head, _digest(head, payload), payload])


def _encode(transfer: int, plan: ChunkPlan, image: PageSource,
            reference: PageSource | None, level: int) -> bytes | bytearray:
    pages = plan.pages
    ranges = plan.ranges
    size = len(pages) * PAGE_SIZE
    xor_bits = bytearray((len(pages) + 7) // 8)
    # The smallest of: the pages stored (None: gathered straight into the frame), the
    # pages compressed, the XOR variant compressed. Stored, XOR gains nothing.
    payload: bytes | None = None
    compressed = False
    if level != 0:
        raw = _scratch()[:size]
        _gather_into(raw, image, ranges)
        body = _delta(raw, pages, reference, xor_bits) if reference is not None else None
        if body is not None and level > TRIAL_ABOVE:
            # Choose the variant by a trial at level 1, then compress only it at ``level``.
            if len(compress(body, 1)) > len(compress(raw, 1)):
                body, xor_bits = None, bytearray(len(xor_bits))
            else:
                raw = memoryview(body)
        plain = compress(raw, level)
        if len(plain) < size:
            payload, compressed = plain, True
        if body is not None and level <= TRIAL_ABOVE:
            delta = compress(body, level)
            if len(delta) < (size if payload is None else len(payload)):
                payload, compressed = delta, True
            else:
                xor_bits = bytearray(len(xor_bits))
        elif body is not None and payload is None:
            xor_bits = bytearray(len(xor_bits))  # the XOR variant did not compress: store
    plen = size if payload is None else len(payload)
    head = b"".join([
        _HEAD.pack(MAGIC, transfer, plan.chunk_id, _COMPRESSED if compressed else 0,
                   len(ranges) // 2),
        pack_ranges(ranges),
        xor_bits,
        _LEN.pack(plen),
    ])
    if payload is None:
        # Stored: the pages are copied into the frame first and the digest is taken over
        # that copy, never over the image: a running guest may write a page in between
        # (v3 encodes from live RAM), and the digest must cover the bytes sent.
        frame = bytearray(len(head) + DIGEST + plen)
        mv = memoryview(frame)
        mv[: len(head)] = head
        body_mv = mv[len(head) + DIGEST :]
        _gather_into(body_mv, image, ranges)
        mv[len(head) : len(head) + DIGEST] = _digest(head, body_mv)
        return frame
    # Compressed: the payload is already a private bytes object; one join builds the
    # frame (no zero-filled bytearray, no second copy), and the frame is bytes, so the
    # v3 feed's bytes(frame) does not copy it again.
    return b"".join([head, _digest(head, payload), payload])


def decode_chunk(
    frame: bytes | bytearray | memoryview, transfer: int, page_limit: int
) -> DecodedChunk:
    """Check and unpack a chunk frame; raises :class:`ChunkError` only."""
    mv = memoryview(frame)
    if len(mv) < _HEAD.size:
        raise ChunkError(f"chunk frame of {len(mv)} bytes is shorter than its header")
    magic, xfer, cid, flags, nranges = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise ChunkError(f"chunk frame: bad magic {bytes(magic)!r}")
    if xfer != transfer:
        raise ChunkError(f"chunk {cid}: belongs to transfer {xfer}")
    if flags & ~(_COMPRESSED | _COPIES) or not 0 < nranges <= CHUNK_PAGES:
        raise ChunkError(f"chunk {cid}: flags {flags:#x} or {nranges} ranges out of bounds")
    ranges, pos = unpack_ranges(mv, _HEAD.size, nranges, cid)
    pages = from_ranges(ranges, page_limit, f"chunk {cid}", CHUNK_PAGES)
    nxor = (len(pages) + 7) // 8
    if len(mv) < pos + nxor:
        raise ChunkError(f"chunk {cid}: frame ends inside its header")
    xor_map = bytes(mv[pos : pos + nxor])
    xor = [bool(xor_map[i // 8] >> (i % 8) & 1) for i in range(len(pages))]
    pos += nxor
    dup: dict[int, int] = {}
    if flags & _COPIES:
        dup, pos = _read_copies(mv, pos, cid, xor)
    if len(mv) < pos + _LEN.size + DIGEST:
        raise ChunkError(f"chunk {cid}: frame ends inside its header")
    (plen,) = _LEN.unpack_from(mv, pos)
    head_end = pos + _LEN.size
    if len(mv) != head_end + DIGEST + plen:
        raise ChunkError(f"chunk {cid}: {len(mv)} bytes, header says {head_end + DIGEST + plen}")
    payload = mv[head_end + DIGEST :]
    if _digest(mv[:head_end], payload) != mv[head_end : head_end + DIGEST]:
        raise ChunkError(f"chunk {cid}: digest mismatch (corrupted in transit)")
    size = (len(pages) - len(dup)) * PAGE_SIZE
    data: bytes
    if flags & _COMPRESSED:
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise ChunkError(f"chunk {cid}: zstd: {exc}") from exc
    else:
        data = bytes(payload)
    if len(data) != size:
        raise ChunkError(f"chunk {cid}: {len(data)} bytes for {len(pages) - len(dup)} pages")
    if dup:
        data = _expand(data, len(pages), dup)
    return DecodedChunk(cid, tuple(pages), tuple(xor), data)


def _read_copies(mv: memoryview, pos: int, cid: int,
                 xor: list[bool]) -> tuple[dict[int, int], int]:
    """The copy pairs of a ``_COPIES`` chunk from ``pos`` (checked: ascending copies, each
    of an earlier page that is neither a copy nor XORed, none XORed itself)."""
    what = f"chunk {cid} copies"
    count, pos = read_varint(mv, pos, what)
    if not 0 < count < len(xor):
        raise ChunkError(f"{what}: {count} copies in a chunk of {len(xor)} pages")
    dup: dict[int, int] = {}
    prev = -1
    for _ in range(count):
        i, pos = read_varint(mv, pos, what)
        j, pos = read_varint(mv, pos, what)
        if not prev < i < len(xor) or not j < i or j in dup or xor[i] or xor[j]:
            raise ChunkError(f"{what}: page {i} as a copy of page {j} is out of order, "
                             f"past the chunk, of a copy or XORed")
        dup[i] = j
        prev = i
    return dup, pos


def _expand(data: bytes, count: int, dup: dict[int, int]) -> bytes:
    """The chunk's pages in full from the sent ones (``data``) and the copies."""
    out: list[bytes] = []
    k = 0
    for i in range(count):
        j = dup.get(i)
        if j is None:
            out.append(data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE])
            k += 1
        else:
            out.append(out[j])
    return b"".join(out)
