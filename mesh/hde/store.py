"""The target's content-addressed page store.

Every image a DC holds — an earlier copy of the VM being migrated, other VMs,
images that finished arriving — is registered with its index. The store then
answers two questions during a transfer: "which copy of this VM do I hold?"
(the *base*, compared position by position in the tree diff) and "do I hold a
page with this key anywhere?" (dedup across versions and across VMs; a key is the
64-bit fingerprint prefix the diff carries, :data:`mesh.hde.image.KEY_SIZE`).

Only pages that would be sent are indexed: zero and uniform pages are never
sent, so they are not worth a dictionary entry. Memory is about 100 bytes
per distinct page (a Python dict entry); a 1 GiB guest of typical content
costs a few MiB.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mesh.hde.image import FP_SIZE, KEY_SIZE, UNIFORM_KEY, ZERO_FP, PageSource
from mesh.hde.index import CHANGED_RUN, PageIndex, changed_pages

__all__ = ["PageStore", "StoredImage"]

_ZERO_RUN = ZERO_FP * CHANGED_RUN


def _not_zero(fps: bytes, page_count: int) -> Iterator[int]:
    """Every page but those in runs of CHANGED_RUN zero pages (a zero page is never
    stored: its key is in UNIFORM_KEY): a sparse image of hundreds of GiB costs one
    compare per 256 pages, not a Python step per page (0.22 s per GiB under load)."""
    step = CHANGED_RUN * FP_SIZE
    for first in range(0, page_count, CHANGED_RUN):
        end = min(first + CHANGED_RUN, page_count)
        if end - first == CHANGED_RUN and fps[first * FP_SIZE : first * FP_SIZE + step] \
                == _ZERO_RUN:
            continue
        yield from range(first, end)

class StoredImage:
    """One image the store holds, with its index."""

    def __init__(self, name: str, image: PageSource, index: PageIndex) -> None:
        if image.page_count != index.page_count:
            raise ValueError(f"image {name!r}: index has {index.page_count} pages, "
                             f"image has {image.page_count}")
        self.name = name
        self.image = image
        self.index = index


class PageStore:
    """Images by name (newest last) and every sendable page by key."""

    def __init__(self) -> None:
        self._images: list[StoredImage] = []
        self._by_name: dict[str, StoredImage] = {}
        self._pages: dict[bytes, tuple[int, int]] = {}

    def add(self, name: str, image: PageSource, index: PageIndex) -> StoredImage:
        """Register an image; a later image under the same name becomes that name's base.

        The same image object again under its name (a migration target's incoming image,
        written in place, after each round) goes over the pages whose fingerprint changed
        only: every other page's key is in the store since the earlier add, so the result
        is the one a pass over every page gives, without an O(pages) Python loop at the
        end of every round (the last of which is in the guest's downtime)."""
        prev = self._by_name.get(name)
        stored = StoredImage(name, image, index)
        slot = len(self._images)
        self._images.append(stored)
        self._by_name[name] = stored
        pages = self._pages
        fps = bytes(index.fps)
        if prev is not None and prev.image is image and prev.index.page_count == index.page_count:
            which: Iterable[int] = changed_pages(bytes(prev.index.fps), fps, index.page_count)
        else:
            which = _not_zero(fps, index.page_count)
        for p in which:
            key = fps[p * FP_SIZE : p * FP_SIZE + KEY_SIZE]
            if key not in pages and key not in UNIFORM_KEY:
                pages[key] = (slot, p)
        return stored

    def base(self, name: str) -> StoredImage | None:
        """The newest image stored under ``name``."""
        return self._by_name.get(name)

    def lookup(self, key: bytes) -> tuple[PageSource, int] | None:
        """An image and page number holding a page with key ``key``."""
        hit = self._pages.get(key)
        if hit is None:
            return None
        slot, page = hit
        return self._images[slot].image, page

    def __len__(self) -> int:
        return len(self._pages)
