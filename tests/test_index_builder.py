"""mesh.hde.index.IndexBuilder: the index of pages indexed as a copy passes over them is
the index of the whole image, whatever the pieces' order (v3 round 1 builds it on two
worker threads while the shadow is written)."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hde.image import PAGE_SIZE, Image
from mesh.hde.index import BLOCK_PAGES, IndexBuilder, build_index


def _image(pages: int, seed: int) -> bytes:
    """Zero blocks, repeated pages and random pages: each kind the index treats apart."""
    rnd = os.urandom(PAGE_SIZE * 8)
    out = bytearray()
    for p in range(pages):
        kind = (p // BLOCK_PAGES + seed) % 3
        if kind == 0:
            out += bytes(PAGE_SIZE)
        elif kind == 1:
            out += rnd[(p % 8) * PAGE_SIZE : (p % 8 + 1) * PAGE_SIZE]
        else:
            out += os.urandom(PAGE_SIZE)
    return bytes(out)


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 6), tail=st.integers(0, BLOCK_PAGES - 1),
       per_piece=st.integers(1, 3), seed=st.integers(0, 2), order=st.randoms())
def test_pieces_in_any_order_make_the_whole_image_index(
        blocks: int, tail: int, per_piece: int, seed: int, order: random.Random) -> None:
    pages = blocks * BLOCK_PAGES + tail
    data = _image(pages, seed)
    step = per_piece * BLOCK_PAGES
    starts = list(range(0, pages, step))
    order.shuffle(starts)
    builder = IndexBuilder(pages)
    for p in starts:
        builder.add(p, data[p * PAGE_SIZE : min(pages, p + step) * PAGE_SIZE])
    built = builder.index()
    whole = build_index(Image(data, "whole"))
    assert built.root == whole.root and bytes(built.fps) == bytes(whole.fps)


def test_a_piece_that_is_not_whole_blocks_or_the_end_is_refused() -> None:
    data = _image(3 * BLOCK_PAGES, 0)
    builder = IndexBuilder(3 * BLOCK_PAGES)
    with pytest.raises(ValueError, match="not whole blocks"):
        builder.add(1, data[PAGE_SIZE : 2 * PAGE_SIZE])
    with pytest.raises(ValueError, match="not whole blocks"):
        builder.add(0, data[: 10 * PAGE_SIZE])
    builder.add(0, data[: BLOCK_PAGES * PAGE_SIZE])
    with pytest.raises(ValueError, match="256 of 768 pages indexed"):
        builder.index()
