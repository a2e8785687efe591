"""What the source of a v3 migration keeps between rounds (see
:mod:`federation.dataplane.v3_source`): the shadow images a round sends from, their last
verified roots and indexes, and the chunk level chosen in round 1.

The shadows are a copy of the VM's pages in the data directory for as long as the
migration runs. On a node that seals its images at rest they are sealed too, under a key
made when the process started and never written anywhere (``scratch_key``): a shadow
left behind by a crash is noise, and nothing has to be published (a scratch
:class:`~federation.vms.sealed_image.SealedWriter`)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

from federation.dataplane.v3_protocol import SAMPLE_PAGES
from federation.dataplane.v3_push import HeldPages
from federation.vms.dirty_scan import SentDigests
from federation.vms.sealed_image import SealedWriter
from federation.vms.sealing import SealKey
from mesh.hde.image import PAGE_SIZE, Image, ImageWriter, create_image
from mesh.hde.index import PageIndex

__all__ = ["SourceState", "sample_pages", "COPY_PAGES"]

#: Pages copied into the shadow per slice: 16 MiB, so a huge image is copied without a
#: huge temporary and the worker thread stays responsive to cancellation.
COPY_PAGES = 4096


class SourceState:
    """What a migration's source keeps between v3 rounds: the shadow images (the content
    the target verified last round, refreshed at each round start), their last verified
    roots and indexes (the XOR reference), and the chunk level chosen in round 1."""

    def __init__(self, directory: Path, scratch_key: SealKey | None = None) -> None:
        self.directory = directory
        self.scratch_key = scratch_key
        self.shadows: dict[str, ImageWriter] = {}
        self.verified: dict[str, tuple[bytes, PageIndex]] = {}
        #: for a backend that finds dirty pages by content (``rescans_dirty``): the digests
        #: of what the shadow holds, so a round sends every page that differs from it
        self.sent: dict[str, SentDigests] = {}
        #: per image the shadow pages changed since the last verified round's index: the
        #: next index is that one refreshed over them (never a pass over the shadow)
        self.unindexed: dict[str, set[int]] = {}
        #: per image the target's pages by fingerprint, as verified (a pushed round's
        #: copies, federation.dataplane.v3_push.HeldPages)
        self.held_pages: dict[str, HeldPages] = {}
        self.level: int | None = None
        self.mode = ""
        #: the target decodes HDE's chunk copies: it offered mesh.versions.HDE_COPIES on
        #: the data channels of the migration's last round (none yet: False)
        self.copies = False

    def reset(self, layout: Sequence[tuple[str, int]]) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.scratch_key
        self.shadows = {
            n: create_image(self.directory / f"{n}.img", c, f"shadow/{n}") if key is None
            else SealedWriter(self.directory / f"{n}.img", key, c, f"shadow/{n}", scratch=True)
            for n, c in layout}

    def close(self) -> None:
        """Let go of the shadows and remove their files; never raises for a shadow whose
        last write fails (a full disk: make netns-chaos seed 10, where that OSError ended
        the node as the migration was dropped): the file is removed next, so nothing in
        it is needed."""
        for img in self.shadows.values():
            with contextlib.suppress(OSError):
                img.close()
        self.shadows = {}
        self.verified = {}
        self.sent = {}
        self.unindexed = {}
        self.held_pages = {}
        shutil.rmtree(self.directory, ignore_errors=True)


#: Pages read from a shadow at once by read_pages: one chunk of a sealed image
#: (federation.vms.sealing.CHUNK_PAGES), decrypted once for all its pages wanted.
_READ_RUN = 16


def read_pages(image: ImageWriter, pages: Sequence[int]) -> dict[int, bytes]:
    """The bytes of ``pages`` (ascending) of ``image``, read a 16-page window at a time."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(pages):
        first = pages[i]
        end = min(image.page_count, (first // _READ_RUN + 1) * _READ_RUN)
        j = i
        while j < len(pages) and pages[j] < end:
            j += 1
        last = pages[j - 1]
        mv = image.view(first, last - first + 1)
        for p in pages[i:j]:
            out[p] = bytes(mv[(p - first) * PAGE_SIZE : (p - first + 1) * PAGE_SIZE])
        i = j
    return out


def sample_pages(images: Sequence[Image]) -> list[bytes]:
    """Up to SAMPLE_PAGES non-uniform pages spread over the images, in 64-page pieces."""
    total = sum(i.page_count for i in images)
    stride = max(1, total // (4 * SAMPLE_PAGES))
    pages: list[bytes] = []
    for img in images:
        for p in range(0, img.page_count, stride):
            page = bytes(img.view(p))
            if page.count(page[0]) != PAGE_SIZE:
                pages.append(page)
                if len(pages) == SAMPLE_PAGES:
                    break
        if len(pages) == SAMPLE_PAGES:
            break
    return [b"".join(pages[i : i + 64]) for i in range(0, len(pages), 64)]
