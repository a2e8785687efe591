"""Sealed images on disk: the file side of :mod:`federation.vms.sealing`.

- :class:`SealedImage` is a read-only :class:`~mesh.hde.image.Image` over a sealed file:
  ``view`` decrypts the chunks a range covers (``pread``, a small LRU of plaintext
  chunks), so HDE indexes, diffs and dedups against it as against an ``mmap``.
- :class:`SealedWriter` is the :class:`~mesh.hde.image.ImageWriter` a migration target
  writes. It never changes the published file in place: its writes go to a work copy
  ``NAME.img.new`` (made from the published file when the first write after a publish
  comes), and :meth:`SealedWriter.flush` publishes it (fsync, rename over, fsync the
  directory). A crash therefore leaves the old file or the new one, never a mix; the
  writes since the last publish are lost, and the migration's root check (the target
  recomputes the root before it may commit) sends the VM's pages again.
- :func:`seal_file` seals a plain file into a new sealed one (an import; a retained copy
  of the qemu backend), :func:`create_sealed` a sealed image of zero pages.

The key comes from the node (:mod:`federation.vms.at_rest_key`); every nonce from
libsodium's random generator.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import nacl.utils

from federation.vms.sealing import (
    CHUNK_PAGES,
    ENTRY_SIZE,
    FILE_ID_SIZE,
    HEADER_SIZE,
    MAGIC,
    NONCE_SIZE,
    SealError,
    SealHeader,
    SealKey,
    decode_header,
    is_zero_entry,
    open_chunk,
    seal_chunk,
    zero_entry,
)
from mesh.hde.image import PAGE_SIZE, Image, ImageError, ImageWriter, PageSource, open_image

__all__ = ["SealedImage", "SealedWriter", "seal_file", "create_sealed", "is_sealed",
           "open_stored", "content_sha256", "unseal_file", "WORK_SUFFIX", "FILE_MODE",
           "SealError"]

FILE_MODE = 0o600
WORK_SUFFIX = ".new"
#: Plaintext chunks kept per image (64 KiB each): 1 MiB, an index block. A target opens
#: every image it holds for dedup, so this is per image held: kept small (the kernel's
#: page cache keeps the ciphertext anyway).
_CACHE_CHUNKS = 16
#: Modified chunks held before the oldest is sealed into the work copy.
_DIRTY_CHUNKS = 64
#: Plain bytes read per step when sealing a file (16 MiB): bounded memory for any size.
_STEP_PAGES = 4096


def _nonce() -> bytes:
    return nacl.utils.random(NONCE_SIZE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_sealed(path: Path) -> bool:
    """Whether ``path`` starts with the sealed format's magic."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    out = os.pread(fd, size, offset)
    while len(out) < size:  # short reads: only at the end of a file that shrank under us
        more = os.pread(fd, size - len(out), offset + len(out))
        if not more:
            break
        out += more
    return out


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _Chunks:
    """Decrypting reads (and, for a writer, sealed writes) of one sealed file's chunks."""

    def __init__(self, fd: int, key: SealKey, header: SealHeader, where: str) -> None:
        self.fd = fd
        self.key = key
        self.header = header
        self.where = where
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        #: guards ``cache`` only: reads decrypt outside it, so threads indexing spans of
        #: one image decrypt in parallel (libsodium releases the GIL)
        self.lock = threading.Lock()

    def read(self, index: int) -> bytes:
        with self.lock:
            hit = self.cache.get(index)
            if hit is not None:
                self.cache.move_to_end(index)
                return hit
        h = self.header
        entry = _pread_exact(self.fd, ENTRY_SIZE, h.entry_offset(index))
        if is_zero_entry(self.key, h, index, entry, self.where):
            plain = bytes(h.chunk_bytes(index))
        else:
            data = _pread_exact(self.fd, h.chunk_bytes(index), h.chunk_offset(index))
            plain = open_chunk(self.key, h, index, entry, data, self.where)
        self._keep(index, plain)
        return plain

    def _keep(self, index: int, plain: bytes) -> None:
        with self.lock:
            self.cache[index] = plain
            self.cache.move_to_end(index)
            if len(self.cache) > _CACHE_CHUNKS:
                self.cache.popitem(last=False)

    def write(self, index: int, plain: bytes) -> None:
        h = self.header
        entry, data = _seal(self.key, h, index, plain)
        if data:  # the data first: the entry that names it is written after
            _pwrite_all(self.fd, data, h.chunk_offset(index))
        _pwrite_all(self.fd, entry, h.entry_offset(index))
        self._keep(index, plain)


def _seal(key: SealKey, header: SealHeader, index: int,
          plain: bytes | memoryview) -> tuple[bytes, bytes]:
    """Chunk ``index``'s entry and data: a zero entry and no data for zero pages (the
    data region keeps what it holds: a hole, or old ciphertext that no longer counts)."""
    raw = plain if isinstance(plain, bytes) else plain.tobytes()  # bytes compare: memcmp
    if raw == (_ZERO_CHUNK if len(raw) == len(_ZERO_CHUNK) else bytes(len(raw))):
        return zero_entry(key, header, index, _nonce()), b""
    return seal_chunk(key, header, index, plain, _nonce())


_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``dst`` (0600) extent by extent (SEEK_DATA/SEEK_HOLE and
    copy_file_range), so a sparse sealed image stays sparse and the kernel moves the
    bytes (or shares them, on a file system that reflinks)."""
    with open(src, "rb") as fin:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd_out, FILE_MODE)
            fd_in = fin.fileno()
            size = os.fstat(fd_in).st_size
            os.ftruncate(fd_out, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd_in, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole remains
                    break
                end = os.lseek(fd_in, start, os.SEEK_HOLE)
                _copy_range(fd_in, fd_out, start, end - start)
                pos = end
        finally:
            os.close(fd_out)


def _copy_range(fd_in: int, fd_out: int, offset: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(fd_in, fd_out, min(count, 1 << 30), offset, offset)
        except OSError:  # not supported between these files: copy through memory
            data = _pread_exact(fd_in, min(count, 1 << 24), offset)
            _pwrite_all(fd_out, data, offset)
            n = len(data)
        if n <= 0:
            raise OSError(f"copy stopped at offset {offset} with {count} bytes to go")
        offset, count = offset + n, count - n


def _open_fd(path: Path, key: SealKey, flags: int, where: str) -> tuple[int, SealHeader]:
    fd = os.open(path, flags)
    try:
        size = os.fstat(fd).st_size
        header = decode_header(_pread_exact(fd, HEADER_SIZE, 0), key, size, where)
    except BaseException:
        os.close(fd)
        raise
    return fd, header


def _view(name: str, header: SealHeader, read: Callable[[int], bytes], page: int,
          count: int) -> memoryview:
    """Pages ``page`` .. ``page + count`` of a sealed image read through ``read``; a
    range outside the image is an ImageError naming it."""
    if page < 0 or count < 1 or page + count > header.page_count:
        if count == 0 and 0 <= page <= header.page_count:
            return memoryview(b"")
        raise ImageError(f"image {name!r}: pages {page}..{page + count} outside "
                         f"0..{header.page_count}")
    return _gather(read, header, page, count)


def _gather(read: Callable[[int], bytes], header: SealHeader, page: int,
            count: int) -> memoryview:
    """Pages ``page .. page+count`` from whole chunks (``read(i)`` -> plaintext)."""
    cp = header.chunk_pages
    first, last = page // cp, (page + count - 1) // cp
    if first == last:
        plain = read(first)
        off = (page - first * cp) * PAGE_SIZE
        return memoryview(plain)[off : off + count * PAGE_SIZE]
    parts = [read(i) for i in range(first, last + 1)]
    joined = b"".join(parts)
    off = (page - first * cp) * PAGE_SIZE
    return memoryview(joined)[off : off + count * PAGE_SIZE]


class SealedImage(Image):
    """A read-only page view of the sealed file ``path`` (see the module docstring)."""

    def __init__(self, path: Path | str, key: SealKey, name: str = "") -> None:
        self.path = Path(path)
        self.name = name or str(path)
        fd, header = _open_fd(self.path, key, os.O_RDONLY, self.name)
        self.header = header
        self._chunks = _Chunks(fd, key, header, self.name)
        self.page_count = header.page_count
        self.nbytes = header.page_count * PAGE_SIZE

    def view(self, page: int, count: int = 1) -> memoryview:
        return _view(self.name, self.header, self._chunks.read, page, count)

    def close(self) -> None:
        if self._chunks.fd >= 0:
            os.close(self._chunks.fd)
            self._chunks.fd = -1
            self._chunks.cache.clear()


class SealedWriter(ImageWriter):
    """A writable sealed image of ``page_count`` pages at ``path`` (module docstring).

    An existing sealed file is the starting content (pages past its end are zero, pages
    past ``page_count`` dropped); without one the image starts as zero pages, published
    at once so the VM's directory always holds a whole image.

    ``scratch``: a working image nobody reads after a crash (a migration source's shadow,
    under a key that lives only in the process): written in place, no work copy, no
    publish."""

    def __init__(self, path: Path | str, key: SealKey, page_count: int, name: str = "",
                 *, scratch: bool = False) -> None:
        self.path = Path(path)
        self.work = self.path.with_name(self.path.name + WORK_SUFFIX)
        self.name = name or str(path)
        self.key = key
        self.page_count = page_count
        self.nbytes = page_count * PAGE_SIZE
        self._lock = threading.Lock()
        self._dirty: OrderedDict[int, bytearray] = OrderedDict()
        self._chunks: _Chunks | None = None  # over the work copy while there is one
        self._published: _Chunks | None = None
        if page_count <= 0:
            raise ImageError(f"image {self.name!r}: page count must be positive")
        self.scratch = scratch
        #: pages written since the owner set it to a set (ImageWriter.written)
        self.written: set[int] | None = None
        if scratch:
            create_sealed(self.path, key, page_count)
            fd, header = _open_fd(self.path, key, os.O_RDWR, self.name)
            self.header = header
            self._published = self._chunks = _Chunks(fd, key, header, self.name)
            return
        try:
            if not self.path.exists():
                create_sealed(self.path, key, page_count)
            fd, header = _open_fd(self.path, key, os.O_RDONLY, self.name)
        except FileNotFoundError as exc:
            raise ImageError(f"image {self.name!r}: {exc}") from None
        if header.page_count != page_count:
            os.close(fd)
            _reseal(self.path, key, page_count, self.name)
            fd, header = _open_fd(self.path, key, os.O_RDONLY, self.name)
        self.header = header
        self._published = _Chunks(fd, key, header, self.name)

    # -------------------------------------------------------------- reading

    def _plain(self, index: int) -> bytes:
        held = self._dirty.get(index)
        if held is not None:
            return bytes(held)
        source = self._chunks or self._published
        assert source is not None, "a closed writer is not read"
        return source.read(index)

    def _read(self, index: int) -> bytes:
        """Chunk ``index`` for a reader: a chunk being written is copied under the lock;
        any other is decrypted outside it, so threads indexing spans of the image (a
        target recomputing its root) decrypt in parallel."""
        with self._lock:
            held = self._dirty.get(index)
            if held is not None:
                return bytes(held)
            source = self._chunks or self._published
        assert source is not None, "a closed writer is not read"
        return source.read(index)

    def view(self, page: int, count: int = 1) -> memoryview:
        return _view(self.name, self.header, self._read, page, count)

    # -------------------------------------------------------------- writing

    def _work_chunks(self) -> _Chunks:
        """The work copy, made from the published file at the first write after a publish
        (a leftover of a crash is overwritten: it was never published)."""
        if self._chunks is None:
            _copy_sparse(self.path, self.work)
            fd, header = _open_fd(self.work, self.key, os.O_RDWR, self.name)
            self._chunks = _Chunks(fd, self.key, header, self.name)
        return self._chunks

    def _chunk_for_write(self, index: int, whole: bool) -> bytearray:
        held = self._dirty.get(index)
        if held is None:
            size = self.header.chunk_pages_of(index) * PAGE_SIZE
            held = bytearray(size) if whole else bytearray(self._plain(index))
            self._dirty[index] = held
            while len(self._dirty) > _DIRTY_CHUNKS:
                old, plain = self._dirty.popitem(last=False)
                self._work_chunks().write(old, bytes(plain))
        else:
            self._dirty.move_to_end(index)
        return held

    def _apply(self, page: int, count: int,
               piece: Callable[[int, int], bytes | memoryview]) -> None:
        """Write pages ``page .. page+count``; ``piece(offset, length)`` gives their bytes
        (``offset`` counted from ``page``)."""
        if page < 0 or count < 0 or page + count > self.page_count:
            raise ImageError(f"image {self.name!r}: pages {page}..{page + count} outside "
                             f"0..{self.page_count}")
        cp = self.header.chunk_pages
        p = page
        end = page + count
        with self._lock:
            while p < end:
                index = p // cp
                c0 = index * cp
                n = min(end, c0 + self.header.chunk_pages_of(index)) - p
                whole = p == c0 and n == self.header.chunk_pages_of(index)
                held = self._chunk_for_write(index, whole)
                off = (p - c0) * PAGE_SIZE
                held[off : off + n * PAGE_SIZE] = piece((p - page) * PAGE_SIZE, n * PAGE_SIZE)
                p += n

    def write(self, page: int, data: bytes | memoryview) -> None:
        if len(data) % PAGE_SIZE:
            raise ImageError(f"image {self.name!r}: a write of {len(data)} bytes is not "
                             "whole pages")
        mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        self._apply(page, len(mv) // PAGE_SIZE, lambda off, n: mv[off : off + n])
        self._wrote(page, len(mv) // PAGE_SIZE)

    def fill(self, page: int, count: int, byte: int) -> None:
        one = bytes([byte]) * (self.header.chunk_pages * PAGE_SIZE)
        self._apply(page, count, lambda off, n: one[:n])
        self._wrote(page, count)

    def copy(self, src: PageSource, src_page: int, page: int, count: int) -> None:
        if src is self and src_page == page:
            # A target reusing its older copy in place copies the blocks its base already
            # holds onto themselves: nothing to do (re-sealing them would rewrite the
            # whole image for nothing).
            if page < 0 or count < 0 or page + count > self.page_count:
                raise ImageError(f"image {self.name!r}: pages {page}..{page + count} "
                                 f"outside 0..{self.page_count}")
            return
        data = bytes(src.view(src_page, count))
        self.write(page, data)

    # -------------------------------------------------------------- publishing

    def flush(self) -> None:
        """Publish: every write so far becomes the file at ``path``, atomically (a crash
        right after leaves the new file; before the rename, the old one)."""
        with self._lock:
            if self.scratch:  # written in place; nothing to publish
                assert self._chunks is not None
                for index, plain in self._dirty.items():
                    self._chunks.write(index, bytes(plain))
                self._dirty.clear()
                return
            if not self._dirty and self._chunks is None:
                return
            work = self._work_chunks()
            for index, plain in self._dirty.items():
                work.write(index, bytes(plain))
            self._dirty.clear()
            os.fsync(work.fd)
            os.replace(self.work, self.path)
            _fsync_dir(self.path.parent)
            if self._published is not None:
                os.close(self._published.fd)
            self._published, self._chunks = work, None  # its fd now names the published file

    def close(self) -> None:
        """Publish (:meth:`flush`) and let go of the file (its descriptor is let go even
        when the flush fails, e.g. on a full disk; the failure is raised)."""
        if self._published is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._published.fd)
            self._published = self._chunks = None


def _write_sealed(dst: Path, key: SealKey, page_count: int,
                  plain_of: Callable[[int, int], bytes | memoryview] | None,
                  file_id: bytes | None = None) -> None:
    """Write a whole sealed file at ``dst`` from ``plain_of(first_page, count)``, atomically
    (temp, fsync, rename, directory fsync): a crash leaves no file or the whole one."""
    header = SealHeader(page_count, file_id or nacl.utils.random(FILE_ID_SIZE), key.key_id)
    tmp = dst.with_name(dst.name + ".sealing")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        _pwrite_all(fd, header.encode(), 0)
        cp = header.chunk_pages
        step = max(cp, _STEP_PAGES - _STEP_PAGES % cp)
        if plain_of is None:  # zero pages: the entries alone, the data a hole
            entries = [zero_entry(key, header, i, _nonce()) for i in range(header.chunk_count)]
            _pwrite_all(fd, b"".join(entries), header.entry_offset(0))
        for first in range(0, page_count if plain_of is not None else 0, step):
            n = min(step, page_count - first)
            assert plain_of is not None
            plain = plain_of(first, n)
            entries = []
            first_chunk = first // cp
            for index in range(first_chunk, (first + n - 1) // cp + 1):
                off = (index * cp - first) * PAGE_SIZE
                piece = plain[off : off + header.chunk_bytes(index)]
                entry, data = _seal(key, header, index, piece)
                if data:
                    _pwrite_all(fd, data, header.chunk_offset(index))
                entries.append(entry)
            _pwrite_all(fd, b"".join(entries), header.entry_offset(first_chunk))
        os.ftruncate(fd, header.file_size)  # zero chunks at the end: a hole to the end
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def create_sealed(dst: Path, key: SealKey, page_count: int) -> None:
    """A sealed image of ``page_count`` zero pages at ``dst`` (atomic: temp and rename)."""
    if page_count <= 0:
        raise ImageError(f"image {str(dst)!r}: page count must be positive")
    _write_sealed(dst, key, page_count, None)


def seal_file(src: Path, dst: Path, key: SealKey) -> int:
    """Seal the plain image ``src`` (a whole number of pages) into ``dst``; its page count.
    Reads ``src`` 16 MiB at a time through its descriptor; atomic at ``dst``."""
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0 or size % PAGE_SIZE:
            raise ImageError(f"{src}: {size} bytes is not a positive number of "
                             f"{PAGE_SIZE}-byte pages")
        pages = size // PAGE_SIZE

        def plain_of(first: int, n: int) -> bytes:
            data = _pread_exact(f.fileno(), n * PAGE_SIZE, first * PAGE_SIZE)
            if len(data) != n * PAGE_SIZE:
                raise ImageError(f"{src} shrank while it was sealed")
            return data

        _write_sealed(dst, key, pages, plain_of)
    return pages


def _reseal(path: Path, key: SealKey, page_count: int, name: str) -> None:
    """Re-seal ``path`` at ``page_count`` pages: its pages where they fit, zeros past its
    end (a layout that changed between two copies of a VM). Atomic."""
    old = SealedImage(path, key, name)
    try:
        keep = min(old.page_count, page_count)

        def plain_of(first: int, n: int) -> bytes:
            have = max(0, min(n, keep - first))
            data = bytes(old.view(first, have)) if have else b""
            return data + bytes((n - have) * PAGE_SIZE)

        _write_sealed(path, key, page_count, plain_of)
    finally:
        old.close()



def open_stored(path: Path, key: SealKey | None, name: str = "") -> Image:
    """A stored image as pages, sealed (read with ``key``) or plain (mapped); a sealed one
    without a key is a :class:`SealError` that says so."""
    if is_sealed(path):
        if key is None:
            raise SealError(f"{path} is sealed at rest and no at-rest key was given")
        return SealedImage(path, key, name or str(path))
    return open_image(path, name or str(path))


def content_sha256(path: Path, key: SealKey | None) -> str:
    """SHA-256 of an image's pages (what a guest sees), sealed or plain: two DCs hold the
    same VM when these agree, whatever their keys."""
    h = hashlib.sha256()
    img = open_stored(path, key)
    try:
        for first in range(0, img.page_count, _STEP_PAGES):
            h.update(img.view(first, min(_STEP_PAGES, img.page_count - first)))
    finally:
        img.close()
    return h.hexdigest()


def unseal_file(src: Path, dst: Path, key: SealKey) -> int:
    """Write the pages of the sealed image ``src`` as a plain file at ``dst`` (a retained
    copy a hypervisor will run again); zero chunks stay holes. Atomic at ``dst`` (temp,
    fsync, rename, directory fsync); its page count."""
    img = SealedImage(src, key, str(src))
    tmp = dst.with_name(dst.name + ".unsealing")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, img.nbytes)
            cp = img.header.chunk_pages
            for index in range(img.header.chunk_count):
                plain = img._chunks.read(index)
                if plain != bytes(len(plain)):
                    _pwrite_all(fd, plain, index * cp * PAGE_SIZE)
                img._chunks.cache.clear()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        img.close()
    return img.page_count
