"""Which pages of a running guest changed: dirty tracking by rescanning page fingerprints.

A scan is an XXH3-64 digest of every page. What a scan compares against decides what it
can miss:

- :class:`SentDigests` (what :mod:`federation.vms.live_migration` uses) compares the live
  image with the digests of the bytes the migration *copied* (its shadow), updated as it
  copies: a page differs from what the target holds exactly when its digest differs, so
  nothing is missed, whatever the guest wrote when.
- :class:`PageScan` (the backend's ``dirty_mark``/``dirty_since``) compares with the scan
  taken at the mark. There is no write event, only content: a page that changed and
  changed back between mark and now (A, B, A) is not reported. A caller that copied it
  while it held B must therefore compare what it copied, not trust the generation: a
  rescan cannot tell "written since" from "different since". Measured on the
  self-checking guest, this is not rare: the target kernel died of a corrupted list
  after a round trusted generations (freed pages zeroed again, lock words toggled).

Why a rescan and not the kernel's soft-dirty bits (``/proc/PID/clear_refs`` 4, then bit
55 of ``/proc/PID/pagemap`` over QEMU's mapping of the RAM file), measured on a booted
guest (docs/qemu.md): the rescan costs one pass of XXH3 over RAM (46 ms per 256 MiB in
16 KiB groups on the shared 2-core machine) and works for disks (written by ``pwrite``,
which leaves no PTE bit) as for RAM; soft-dirty would cost a read of 8 bytes per page,
but (1) the kernels of these machines are built without it (``CONFIG_MEM_SOFT_DIRTY`` is
not set: the bit never appears, :func:`soft_dirty_available` probes it), and (2) on a
shared file mapping the bit lives only in the PTE: when reclaim or swap-out zaps the PTE
of a written page the bit is lost, so it is only sound with the RAM file on tmpfs with
no swap (or mlocked). A false "clean" would put a stale page in the target guest; a
rescan cannot miss a change.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping

import xxhash

from mesh.hde.image import PAGE_SIZE, PageSource

__all__ = ["PageScan", "SentDigests", "scan_digests", "changed_pages", "group_digests",
           "soft_dirty_available", "DIGEST", "GROUP_PAGES"]

DIGEST = 8
_xxh64 = xxhash.xxh3_64_digest
#: Pages compared at once: equal digest runs of a 1 MiB block are skipped in one compare.
_RUN = 256


def scan_digests(image: PageSource) -> bytes:
    """The XXH3-64 digest of every page of ``image``, concatenated (8 bytes a page)."""
    out = []
    for first in range(0, image.page_count, _RUN):
        n = min(_RUN, image.page_count - first)
        mv = image.view(first, n)
        out.append(b"".join([_xxh64(mv[i : i + PAGE_SIZE])
                             for i in range(0, n * PAGE_SIZE, PAGE_SIZE)]))
    return b"".join(out)


def changed_pages(old: bytes, new: bytes) -> list[int]:
    """Pages whose digest differs between two scans of one image, ascending."""
    if len(old) != len(new):
        raise ValueError(f"scans of {len(old) // DIGEST} and {len(new) // DIGEST} pages")
    out: list[int] = []
    step = _RUN * DIGEST
    for off in range(0, len(new), step):
        if old[off : off + step] == new[off : off + step]:
            continue
        first = off // DIGEST
        for i in range(min(_RUN, (len(new) - off) // DIGEST)):
            o = off + i * DIGEST
            if old[o : o + DIGEST] != new[o : o + DIGEST]:
                out.append(first + i)
    return out


#: Pages per group digest of :class:`SentDigests`: one XXH3 call per 16 KiB runs at
#: memory speed (14 ms per 144 MiB on the shared machine, where one call per 4 KiB page
#: took 41 ms: the per-call cost dominates), and only the groups that differ are hashed
#: page by page.
GROUP_PAGES = 4
#: A group digest that stands for "compare page by page" (see SentDigests.read).
_UNKNOWN = b"\xa5" * DIGEST


def group_digests(image: PageSource) -> bytes:
    out = []
    step = GROUP_PAGES * PAGE_SIZE
    for first in range(0, image.page_count, _RUN * GROUP_PAGES):
        n = min(_RUN * GROUP_PAGES, image.page_count - first)
        mv = image.view(first, n)
        out.append(b"".join([_xxh64(mv[i : i + step]) for i in range(0, n * PAGE_SIZE, step)]))
    return b"".join(out)


class SentDigests:
    """The digests of what a migration copied of one image (its shadow): ``changed(live)``
    is every page whose live content differs from the copy (a scan of 16 KiB groups, then
    the pages of the groups that differ), ``copied(shadow, pages)`` records new copies."""

    def __init__(self, shadow: PageSource) -> None:
        self.page_count = shadow.page_count
        self.groups = bytearray(group_digests(shadow))
        self.pages = bytearray(scan_digests(shadow))

    @classmethod
    def blank(cls, page_count: int) -> SentDigests:
        """Digests of an image nothing of which was recorded yet: every group compares page
        by page until :meth:`read` records it (how a copy made a piece at a time records
        the bytes it copied, without reading its copy back)."""
        obj = cls.__new__(cls)
        obj.page_count = page_count
        obj.groups = bytearray(_UNKNOWN * -(-page_count // GROUP_PAGES))
        obj.pages = bytearray(page_count * DIGEST)
        return obj

    def changed(self, live: PageSource) -> list[int]:
        if live.page_count != self.page_count:
            raise ValueError(f"{live.page_count} pages live, {self.page_count} sent")
        out: list[int] = []
        pages = memoryview(self.pages)
        for g in changed_pages(bytes(self.groups), group_digests(live)):
            first = g * GROUP_PAGES
            for p in range(first, min(first + GROUP_PAGES, self.page_count)):
                if _xxh64(live.view(p)) != pages[p * DIGEST : (p + 1) * DIGEST]:
                    out.append(p)
        return out

    def read(self, first: int, data: bytes | bytearray | memoryview) -> None:
        """Record pages ``first``.. as sent with the bytes ``data`` (read from the live
        image by a round that sends straight from it, without a shadow). A group only
        partly in ``data`` gets a digest no scan yields (2^-64 odds), so the next
        ``changed`` compares its pages one by one."""
        mv = memoryview(data)
        n = len(mv) // PAGE_SIZE
        d, gd = self.pages, self.groups
        for i in range(n):
            p = first + i
            d[p * DIGEST : (p + 1) * DIGEST] = _xxh64(mv[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
        for g in range(first // GROUP_PAGES, (first + n - 1) // GROUP_PAGES + 1):
            lo = g * GROUP_PAGES
            hi = min(lo + GROUP_PAGES, self.page_count)
            if lo >= first and hi <= first + n:
                digest = _xxh64(mv[(lo - first) * PAGE_SIZE : (hi - first) * PAGE_SIZE])
            else:
                digest = _UNKNOWN
            gd[g * DIGEST : (g + 1) * DIGEST] = digest

    def copied(self, shadow: PageSource, pages: list[int],
               data: Mapping[int, bytes] | None = None) -> None:
        """``pages`` were copied into ``shadow`` (``data``: the bytes written, page by
        page, so a page's digest needs no read of the shadow; a group's does)."""
        d, gd = self.pages, self.groups
        for p in pages:
            d[p * DIGEST : (p + 1) * DIGEST] = _xxh64(shadow.view(p) if data is None
                                                      else data[p])
        for g in sorted({p // GROUP_PAGES for p in pages}):
            first = g * GROUP_PAGES
            n = min(GROUP_PAGES, self.page_count - first)
            gd[g * DIGEST : (g + 1) * DIGEST] = _xxh64(shadow.view(first, n))


class PageScan:
    """Generations of page digests of one VM's images (see module doc). The last ``keep``
    generations are kept; ``since`` a forgotten generation reports every page."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.generation = 0
        self._scans: dict[int, dict[str, bytes]] = {}

    def mark(self, images: Mapping[str, PageSource]) -> int:
        self.generation += 1
        self._scans[self.generation] = {n: scan_digests(img) for n, img in images.items()}
        for old in [g for g in self._scans if g <= self.generation - self.keep]:
            del self._scans[old]
        return self.generation

    def since(self, images: Mapping[str, PageSource], mark: int) -> dict[str, list[int]]:
        held = self._scans.get(mark)
        out: dict[str, list[int]] = {}
        for name in sorted(images):
            img = images[name]
            old = None if held is None else held.get(name)
            if old is None or len(old) != img.page_count * DIGEST:
                pages = list(range(img.page_count))
            else:
                pages = changed_pages(old, scan_digests(img))
            if pages:
                out[name] = pages
        return out


def soft_dirty_available() -> str | None:
    """None if the kernel tracks soft-dirty bits on a shared file mapping, else why not:
    maps a page of a temporary file, clears the bits, writes the page and reads pagemap."""
    try:
        with tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
            f.truncate(PAGE_SIZE)
            m = mmap.mmap(f.fileno(), PAGE_SIZE, mmap.MAP_SHARED)
            try:
                buf = ctypes.c_char.from_buffer(m)
                addr = ctypes.addressof(buf)
                with open("/proc/self/clear_refs", "w") as cr:
                    cr.write("4")
                m[0] = 1
                with open("/proc/self/pagemap", "rb") as pm:
                    pm.seek(addr // PAGE_SIZE * 8)
                    (entry,) = struct.unpack("<Q", pm.read(8))
                del buf
            finally:
                m.close()
    except OSError as exc:
        return f"cannot probe /proc/self/clear_refs and pagemap: {exc}"
    if not entry >> 55 & 1:
        return "the kernel sets no soft-dirty bit on a written page (CONFIG_MEM_SOFT_DIRTY off)"
    return None
