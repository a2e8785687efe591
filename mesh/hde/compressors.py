"""zstd compressors for HDE chunks: zstd's levels, with parameters of its own above 12.

A chunk is an independent zstd frame of at most 1 MiB (256 pages), and what
fills it is guest memory: kernel structures full of 8-byte pointers, page
tables, text, and data the guest compressed itself. zstd's level table for
inputs above 256 KiB (the one it uses for a 1 MiB chunk) keeps the lazy
match finders up to level 15 and sizes its tables for inputs of many MiB.
Measured on 1 MiB chunks of guest memory, the optimal parser (btopt/btultra)
with a minimum match of 3 bytes (pointer fields share their low bytes),
tables sized to the chunk (2**18 entries) and a shallow search gives a
smaller output at the speed of zstd's level 15, and HDE's level 15 beats
zstd's 16 on both size and speed. Measured with libzstd 1.5.7 (python-zstandard 0.25) on
this 2-core machine, per CPU second, ratio = output / input, on up to 40 chunks
of the pages a transfer sends (XOR deltas applied where the encoder applies
them; docs/BENCHMARKS.md, issue 6 section):

    chunks of             zstd 15          zstd 16          HDE 13           HDE 15
    1 GiB guest, t0       0.279  15 MB/s   0.271  7.4 MB/s  0.264  21 MB/s   0.254  13 MB/s
    t0 -> t0+60 s         0.308  39 MB/s   0.304  15 MB/s   0.306  44 MB/s   0.303  28 MB/s
    sibling guest         0.402  16 MB/s   0.396  8.8 MB/s  0.384  18 MB/s   0.375  12 MB/s
    t0 -> t0+600 s        0.437  17 MB/s   0.431  9.6 MB/s  0.435  26 MB/s   0.431  16 MB/s
    ext4 disk v2          0.169  12 MB/s   0.161  8.4 MB/s  0.172  23 MB/s   0.162  14 MB/s
    process memory        0.387  17 MB/s   0.381  9.6 MB/s  0.381  23 MB/s   0.374  14 MB/s

(speeds per CPU second on a machine shared with other jobs: +-20 % between runs).
Levels 17-19 take zstd's own parameters for inputs up to 256 KiB (the same
parsers with deeper searches), widened to the chunk's 1 MiB window. Levels up
to 12 and negative levels are zstd's as they are. The decoder needs none of
this: a zstd frame carries its window size, and every window here is 1 MiB.
"""

from __future__ import annotations

import threading

import zstandard

__all__ = ["HIGH_LEVEL_PARAMS", "compress", "compressor"]

#: A chunk's window: it holds 256 pages of 4 KiB (mesh.hde.messages.CHUNK_PAGES).
_WINDOW_LOG = 20
#: Hash and chain tables of 2**18 entries, as zstd's small-input table uses; the grid
#: behind HIGH_LEVEL_PARAMS was measured with them. zstd's level 16 for a 1 MiB input
#: (2**21 tables, search 5) took 1.6x the time of the same parser with 2**18 tables
#: and search 4, for 0.1 % less output on the warm chunks.
_TABLE_LOG = 18
#: Inputs zstd's small-input table is for (its third size class, <= 256 KiB).
_SMALL_INPUT = 256 * 1024

#: Levels 13-16 as (strategy, search log, min match, target length): from a grid
#: (search 1-5, min match 3-6, target length 16-128, btopt/btultra/btultra2) measured on
#: the corpus guest's cold (t0) and warm (t0 -> t0+60 s) chunks, the settings on the
#: front of size against speed, spaced into a ladder from zstd 15's speed down to
#: zstd 16's; the docstring's other rows check them on data they were not chosen on.
HIGH_LEVEL_PARAMS: dict[int, tuple[int, int, int, int]] = {
    13: (zstandard.STRATEGY_BTOPT, 1, 3, 32),
    14: (zstandard.STRATEGY_BTOPT, 2, 3, 96),
    15: (zstandard.STRATEGY_BTOPT, 3, 3, 128),
    16: (zstandard.STRATEGY_BTOPT, 4, 3, 64),
}

_local = threading.local()


def _params(level: int) -> zstandard.ZstdCompressionParameters | None:
    if level in HIGH_LEVEL_PARAMS:
        strategy, search, min_match, target = HIGH_LEVEL_PARAMS[level]
        return zstandard.ZstdCompressionParameters(
            window_log=_WINDOW_LOG, chain_log=_TABLE_LOG, hash_log=_TABLE_LOG,
            search_log=search, min_match=min_match, target_length=target, strategy=strategy)
    if level > max(HIGH_LEVEL_PARAMS):
        p = zstandard.ZstdCompressionParameters.from_level(level, source_size=_SMALL_INPUT)
        return zstandard.ZstdCompressionParameters(
            window_log=_WINDOW_LOG, chain_log=p.chain_log, hash_log=p.hash_log,
            search_log=p.search_log, min_match=p.min_match, target_length=p.target_length,
            strategy=p.strategy)
    return None


def compressor(level: int) -> zstandard.ZstdCompressor:
    """The compressor for ``level``, one per thread (they are not thread-safe)."""
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        params = _params(level)
        c = cache[level] = (zstandard.ZstdCompressor(level=level) if params is None
                            else zstandard.ZstdCompressor(compression_params=params))
    return c


def compress(data: bytes | memoryview, level: int) -> bytes:
    """zstd at HDE's ``level`` (see the module docstring)."""
    return compressor(level).compress(data)
