"""Images as sequences of 4 KiB pages, and what HDE knows about a single page.

An :class:`Image` is a read-only view of a VM image (guest RAM, a disk) held in
a buffer: bytes in memory for tests, or an ``mmap`` of a file, so an image of
hundreds of GiB is never read into memory — the kernel pages it in as the
indexer and the encoder touch it. An :class:`ImageWriter` is the target's
writable image, the injected sink a :class:`~mesh.hde.session.HdeTarget` writes.

Page fingerprints are XXH3-128. They name pages for the diff and for dedup;
they are *not* what makes a transfer trustworthy: the Merkle tree's leaves are
cryptographic digests of each 1 MiB block's content (see :mod:`mesh.hde.index`),
and the target checks every block it assembled against them. Why not
BLAKE2b-128 per page: measured on this machine (2 cores, Python text as data),
per-page ``hashlib.blake2b`` runs at 948 MB/s on one thread and *drops* to
815 MB/s on two (a GIL hand-off per 4 KiB call), while XXH3-128 runs at
9.4 GB/s and SHA-256 over 1 MiB blocks scales from 1.4 to 2.6 GB/s on two
threads. A crafted XXH3 collision can therefore only make a block fail its
check and be re-sent without dedup; it can never put a wrong page in an image.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Protocol

import xxhash

__all__ = [
    "PAGE_SIZE",
    "FP_SIZE",
    "ImageError",
    "Image",
    "ImageWriter",
    "Overlay",
    "PageSource",
    "fingerprint",
    "page_key",
    "KEY_SIZE",
    "ZERO_FP",
    "UNIFORM_FP",
    "UNIFORM_KEY",
    "uniform_byte",
    "open_image",
    "create_image",
    "data_runs",
    "file_data_runs",
]

#: x86-64 base page size: the unit QEMU's RAM migration tracks dirtiness in.
PAGE_SIZE = 4096
#: 128-bit fingerprints: a birthday collision among 2**40 distinct pages (4 PiB)
#: has probability ~2**-49.
FP_SIZE = 16

#: Bytes of a page's fingerprint the diff sends and the store looks pages up by. A
#: wrong match needs a page's key to equal that of another page the target holds:
#: with S distinct pages stored that is S / 2**64 per lookup, 2**-36 for a 1 TiB
#: store (S = 2**28), so a 1 TiB transfer meets one with probability 2**-8, and
#: it then costs one block re-sent (the cryptographic block digests catch it). The
#: other half of the 128 bits would add 8 bytes to every changed page's entry in
#: the diff (measured: 0.2 MB of the 11 MB of a 1 GiB guest's warm transfer).
KEY_SIZE = 8

_fp = xxhash.xxh3_128_digest


class ImageError(Exception):
    """An image that cannot be used (wrong size, unreadable, page out of range)."""


def fingerprint(page: bytes | memoryview) -> bytes:
    """The 128-bit fingerprint of one page."""
    return _fp(page)


def page_key(page: bytes | memoryview) -> bytes:
    """The key of one page: its fingerprint's first :data:`KEY_SIZE` bytes."""
    return _fp(page)[:KEY_SIZE]


#: The 256 pages whose bytes are all equal, and their fingerprints. Such pages
#: (zero pages above all) are never sent: their fingerprint says what they are.
_UNIFORM_PAGES = tuple(bytes([b]) * PAGE_SIZE for b in range(256))
UNIFORM_FP: dict[bytes, int] = {_fp(p): b for b, p in enumerate(_UNIFORM_PAGES)}
ZERO_FP = _fp(_UNIFORM_PAGES[0])
UNIFORM_KEY: dict[bytes, int] = {fp[:KEY_SIZE]: b for fp, b in UNIFORM_FP.items()}


def uniform_byte(fp: bytes) -> int | None:
    """The byte a uniform page repeats, if ``fp`` is a uniform page's fingerprint."""
    return UNIFORM_FP.get(fp)


class PageSource(Protocol):
    """Anything pages can be read from."""

    page_count: int
    nbytes: int

    def view(self, page: int, count: int = 1) -> memoryview: ...


class Image:
    """A read-only sequence of pages over a buffer (bytes, bytearray or mmap)."""

    #: a descriptor of the file mapped (open_image), asked where its holes are; a class
    #: default, so a subclass that builds its own view (a sealed image) has none
    _fd: int | None = None

    def __init__(self, buffer: bytes | bytearray | mmap.mmap | memoryview, name: str = "") -> None:
        mv = memoryview(buffer)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if len(mv) % PAGE_SIZE:
            raise ImageError(
                f"image {name!r}: {len(mv)} bytes is not a whole number of {PAGE_SIZE}-byte pages"
            )
        self._buffer = buffer
        self._mv = mv
        self.name = name
        self.page_count = len(mv) // PAGE_SIZE
        self.nbytes = len(mv)

    def data_runs(self, page: int, count: int) -> list[tuple[int, int]]:
        """(first page, count) runs of pages ``page``..``page + count`` that may hold data;
        every other page of the range is a hole of the file and reads as zeros. An image
        not over a file answers the whole range."""
        if self._fd is None:
            return [(page, count)]
        return file_data_runs(self._fd, page, count)

    def view(self, page: int, count: int = 1) -> memoryview:
        if page < 0 or count < 0 or page + count > self.page_count:
            raise ImageError(
                f"image {self.name!r}: pages {page}..{page + count} outside 0..{self.page_count}"
            )
        try:
            return self._mv[page * PAGE_SIZE : (page + count) * PAGE_SIZE]
        except ValueError:  # released: the image was closed meanwhile (a migration ended)
            raise ImageError(f"image {self.name!r} is closed") from None

    def close(self) -> None:
        self._mv.release()
        if isinstance(self._buffer, mmap.mmap):
            try:
                self._buffer.close()
            except BufferError:
                # A reader (a worker thread indexing the image for a migration that just
                # ended) still holds a view of the mapping: the mapping stays valid for it
                # and is unmapped when its last view goes; this image is closed all the same
                # (the QEMU acceptance, seed 1717: the close raised and ended the node).
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ImageWriter(Image):
    """A writable image of a fixed number of pages: the target's copy under construction.

    A writer over a file mapping (:func:`create_image`, ``map_writable``) writes through a
    descriptor of the file (``pwrite``), not through the mapping, and reads through the
    mapping (one page cache: what was written reads back at once). A store into a hole
    of a shared mapping on a full file system raises SIGBUS, which ends the process; the
    same write through the descriptor fails with ``OSError(ENOSPC)``, which the round
    that wrote it handles (a full disk fails a migration, never the node)."""

    #: a descriptor of the mapped file, opened for writing (None: writes go to the buffer)
    _wfd: int | None = None
    #: every page this writer did not write reads as zeros (a new sparse file, a new
    #: anonymous mapping): a target then leaves the zero blocks of an image as they
    #: are instead of filling them (mesh.hde.target). A class default, so a subclass
    #: with its own construction (a sealed writer) says no
    zeroed = False

    def __init__(self, buffer: bytearray | mmap.mmap, name: str = "") -> None:
        super().__init__(buffer, name)
        if self._mv.readonly:
            raise ImageError(f"image {name!r}: the buffer is read-only")
        #: pages written through write/fill/copy since the owner set it to a set (None: not
        #: tracked): what an index of this image must be refreshed over
        self.written: set[int] | None = None

    def _wrote(self, page: int, count: int) -> None:
        if self.written is not None:
            self.written.update(range(page, page + count))

    def write(self, page: int, data: bytes | memoryview) -> None:
        if len(data) % PAGE_SIZE:
            raise ImageError(
                f"image {self.name!r}: a write of {len(data)} bytes is not whole pages"
            )
        if self._wfd is None:
            self.view(page, len(data) // PAGE_SIZE)[:] = data
        else:
            self.view(page, len(data) // PAGE_SIZE)  # the bounds check
            _pwrite_all(self._wfd, data, page * PAGE_SIZE)
        self._wrote(page, len(data) // PAGE_SIZE)

    def fill(self, page: int, count: int, byte: int) -> None:
        # In pieces of 256 pages, so filling a huge range never allocates more than 1 MiB.
        piece = _UNIFORM_PAGES[byte] * min(count, 256)
        dst = self.view(page, count)
        for off in range(0, len(dst), len(piece)):
            n = min(len(piece), len(dst) - off)
            if self._wfd is None:
                dst[off : off + n] = piece[:n]
            else:
                _pwrite_all(self._wfd, memoryview(piece)[:n], page * PAGE_SIZE + off)
        self._wrote(page, count)

    def copy(self, src: PageSource, src_page: int, page: int, count: int) -> None:
        if src is self and src_page == page:
            return  # a target that is its own base keeps a page in place: nothing changes
        if self._wfd is None:
            self.view(page, count)[:] = src.view(src_page, count)
        else:
            self.view(page, count)  # the bounds check
            _pwrite_all(self._wfd, src.view(src_page, count), page * PAGE_SIZE)
        self._wrote(page, count)

    def close(self) -> None:
        super().close()
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (a short write goes on where it
    stopped; a full disk raises ``OSError(ENOSPC)``)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class Overlay:
    """A page source: ``image`` except the pages in ``old`` (page -> bytes). A migration's
    source uses it as the XOR reference of a round: its shadow as it was before the round
    refreshed those pages, i.e. what the target's base holds."""

    def __init__(self, image: PageSource, old: dict[int, bytes]) -> None:
        self.image = image
        self.old = old
        self.page_count = image.page_count
        self.nbytes = image.nbytes

    def view(self, page: int, count: int = 1) -> memoryview:
        if count == 1:
            held = self.old.get(page)
            return memoryview(held) if held is not None else self.image.view(page)
        if not any(p in self.old for p in range(page, page + count)):
            return self.image.view(page, count)
        return memoryview(b"".join(bytes(self.view(p)) for p in range(page, page + count)))


def file_data_runs(fd: int, page: int, count: int) -> list[tuple[int, int]]:
    """The runs of pages ``page``..``page + count`` of the file ``fd`` that hold data, as
    ``lseek(SEEK_DATA)`` / ``lseek(SEEK_HOLE)`` report them (lseek(2)): a sparse image of
    hundreds of GiB with a few written regions costs a few calls, not a read of every
    zero page. A file system without hole tracking reports the whole file as data, which
    is still correct (the pages are then read). Each call names its offset, so threads
    may share ``fd``."""
    end = (page + count) * PAGE_SIZE
    pos = page * PAGE_SIZE
    runs: list[tuple[int, int]] = []
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        first, last = data // PAGE_SIZE, -(-hole // PAGE_SIZE)
        runs.append((first, last - first))
        pos = last * PAGE_SIZE
    return runs


def data_runs(image: PageSource, page: int, count: int) -> list[tuple[int, int]]:
    """What :meth:`Image.data_runs` says of ``image``; the whole range for a page source
    that does not know its holes."""
    ask = getattr(image, "data_runs", None)
    return [(page, count)] if ask is None else list(ask(page, count))


def open_image(path: str | os.PathLike[str], name: str = "") -> Image:
    """Map a file read-only. An empty file is refused: mmap cannot map it. The image keeps
    a descriptor of the file to find its holes (:meth:`Image.data_runs`)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ImageError(f"image {os.fspath(path)!r} is empty")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        img = Image(m, name or os.fspath(path))
        img._fd = os.dup(f.fileno())
    return img


def create_image(path: str | os.PathLike[str], page_count: int, name: str = "") -> ImageWriter:
    """Create (or truncate) a sparse file of ``page_count`` pages and map it writable."""
    if page_count <= 0:
        raise ImageError(f"image {os.fspath(path)!r}: page count must be positive")
    with open(path, "w+b") as f:
        f.truncate(page_count * PAGE_SIZE)
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
        w = ImageWriter(m, name or os.fspath(path))
        w._wfd = os.dup(f.fileno())  # writes go through it (ImageWriter: no SIGBUS)
    w.zeroed = True  # truncated to 0 and extended: a hole
    return w
