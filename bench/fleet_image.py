"""The image phase of ``dwcp bench fleet``: a sparse VM image of ``gib`` GiB (a file
truncated to that size, :data:`REGIONS` regions of :data:`REGION_BYTES` written with real
bytes, this repository's source text) indexed by :func:`mesh.hde.index.build_index`
as a node's image backend indexes an image VM (``open_image``: a read-only mapping).

Figures: ``index_s`` and ``index_s_per_gib``; ``index_bytes_per_gib`` (the index's arrays:
16 bytes of fingerprint per page, 32 per 1 MiB block, the inner levels); what the build
allocated by tracemalloc (``index_tracemalloc_peak_mib``) and the process's RSS growth
(``index_rss_growth_mib``); ``python_objects_added`` (``gc`` objects after the build minus
before: a Python object per page would show as millions); and the planning of a transfer
to an empty target over the real HDE cores (:func:`mesh.hde.loopback.run_transfer`:
the diff's messages encoded and decoded, the wanted pages' chunks encoded and written)
of a ``plan_gib`` GiB sparse image of the same shape (``plan_s_per_gib``), into a new
sparse file as a node's target writes (the target compares the source's tree with the
zero image's: only blocks with data are listed, the zero ones left as holes).
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mesh.hde.image import PAGE_SIZE, create_image, open_image
from mesh.hde.index import DIGEST_SIZE, build_index
from mesh.hde.loopback import run_transfer
from mesh.hde.store import PageStore

__all__ = ["sparse_image", "index_figures", "plan_figures"]

#: Written regions and their size: a few MiB of data in a huge, mostly empty image (a
#: freshly installed guest's disk).
REGIONS, REGION_BYTES = 8, 4 << 20
GIB = 1 << 30


def _text() -> bytes:
    root = Path(__file__).resolve().parent.parent
    return b"".join(p.read_bytes() for p in sorted((root / "mesh").rglob("*.py")))


def sparse_image(path: Path, gib: int) -> int:
    """Truncate ``path`` to ``gib`` GiB and write the regions spread over it; bytes
    written."""
    text = _text()
    data = (text * (REGION_BYTES // len(text) + 1))[:REGION_BYTES]
    size = gib * GIB
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(REGIONS):
            # spread over the image, not aligned to a block: the regions cross blocks
            f.seek((size // REGIONS) * i + 12_345 * PAGE_SIZE % (size // REGIONS))
            f.write(data[i:] + data[:i])
    return REGIONS * REGION_BYTES


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def index_figures(directory: Path, gib: int) -> dict[str, Any]:
    path = directory / "sparse.img"
    written = sparse_image(path, gib)
    img = open_image(path)
    try:
        with ThreadPoolExecutor(2) as ex:
            gc.collect()
            objects0, rss0 = len(gc.get_objects()), _rss()
            tracemalloc.start()
            t = time.perf_counter()
            ix = build_index(img, ex)
            took = time.perf_counter() - t
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            gc.collect()
            objects1, rss1 = len(gc.get_objects()), _rss()
        held = len(ix.fps) + sum(len(level) for level in ix.levels)
        on_disk = os.stat(path).st_blocks * 512
    finally:
        img.close()
        path.unlink()
    return {"image_gib": gib, "image_written_bytes": written,
            "image_allocated_bytes": on_disk, "index_s": round(took, 2),
            "index_s_per_gib": round(took / gib, 4),
            "index_bytes": held, "index_bytes_per_gib": round(held / gib),
            "index_tracemalloc_peak_mib": round(peak / 2**20, 1),
            "index_rss_growth_mib": round((rss1 - rss0) / 2**20, 1),
            "python_objects_added": objects1 - objects0,
            "index_root": ix.root.hex()[:16], "index_blocks": len(ix.levels[0]) // DIGEST_SIZE}


def plan_figures(directory: Path, gib: int) -> dict[str, Any]:
    path = directory / "plan.img"
    target = directory / "plan-target.img"
    result = None
    sparse_image(path, gib)
    img = open_image(path)
    try:
        with ThreadPoolExecutor(2) as ex:
            ix = build_index(img, ex)
            t = time.perf_counter()
            result = run_transfer(image=img, index=ix, name="disk", store=PageStore(),
                                  level=1, executor=ex,
                                  make_sink=lambda pages: create_image(target, pages))
            took = time.perf_counter() - t
    finally:
        img.close()
        path.unlink()
        if result is not None and result.image is not None:
            result.image.close()
        target.unlink(missing_ok=True)
    if not result.verified:
        raise RuntimeError(f"the planned transfer did not verify: {result.failure}")
    return {"plan_gib": gib, "plan_s": round(took, 2), "plan_s_per_gib": round(took / gib, 3),
            "plan_control_bytes": result.control_bytes, "plan_chunk_bytes": result.chunk_bytes,
            "plan_pages_wanted": result.stats["pages_wanted"],
            "plan_pages_uniform": result.stats["pages_uniform"]}
