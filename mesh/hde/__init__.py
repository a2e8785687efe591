"""HDE, hierarchical delta encoding: send a VM image as only what the target lacks.

- :mod:`mesh.hde.image`: images as 4 KiB pages (in memory or mmap), fingerprints.
- :mod:`mesh.hde.index`: the page index and Merkle tree with a cryptographic root.
- :mod:`mesh.hde.store`: the target's content-addressed page store.
- :mod:`mesh.hde.source`, :mod:`mesh.hde.target`: the sans-I/O diff session cores;
  :mod:`mesh.hde.events`: their events and actions beyond :mod:`mesh.core`'s.
- :mod:`mesh.hde.entries`: how a diff reply names pages (key, base page, run).
- :mod:`mesh.hde.codec`: chunk encoding (dedup, XOR delta, zstd, copies) and decoding.
- :mod:`mesh.hde.similar`: which pages share a chunk (similarity sketches).
- :mod:`mesh.hde.compressors`: zstd per level, with HDE's own parameters for levels 13-19.
- :mod:`mesh.hde.level`: the zstd level from link mode and measured speeds.
- :mod:`mesh.hde.loopback`: an in-process driver (tests, benchmarks).
"""

from mesh.hde.codec import ChunkError, ChunkPlan, decode_chunk, encode_chunk
from mesh.hde.events import ChunkArrived, EncodeChunk, RecomputeRoot, RootRecomputed
from mesh.hde.image import (
    PAGE_SIZE,
    ZERO_FP,
    Image,
    ImageError,
    ImageWriter,
    create_image,
    fingerprint,
    open_image,
)
from mesh.hde.index import BLOCK_PAGES, PageIndex, build_index
from mesh.hde.level import (
    LEVELS,
    MODE_LEVELS,
    LevelGovernor,
    LevelSample,
    choose_level,
    measure_ladder,
    measure_levels,
)
from mesh.hde.source import HdeSource
from mesh.hde.store import PageStore
from mesh.hde.target import HdeTarget

__all__ = [
    "PAGE_SIZE",
    "BLOCK_PAGES",
    "ZERO_FP",
    "Image",
    "ImageWriter",
    "ImageError",
    "open_image",
    "create_image",
    "fingerprint",
    "PageIndex",
    "build_index",
    "PageStore",
    "HdeSource",
    "HdeTarget",
    "EncodeChunk",
    "ChunkArrived",
    "RecomputeRoot",
    "RootRecomputed",
    "ChunkPlan",
    "ChunkError",
    "encode_chunk",
    "decode_chunk",
    "MODE_LEVELS",
    "LEVELS",
    "LevelGovernor",
    "LevelSample",
    "choose_level",
    "measure_ladder",
    "measure_levels",
]
