"""The target's page store: adding a target's incoming image again after a round (the same
image object, written in place) goes over the changed pages only, with the result a pass
over every page gives."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hde.image import PAGE_SIZE, Image, ImageWriter
from mesh.hde.index import build_index
from mesh.hde.store import PageStore

PAGES = 700  # not a multiple of the compare run: the last run is short


def _image(seed: int) -> ImageWriter:
    rng = random.Random(seed)
    data = bytearray(PAGES * PAGE_SIZE)
    for p in range(0, PAGES, 2):
        data[p * PAGE_SIZE : p * PAGE_SIZE + 32] = rng.randbytes(32)
    return ImageWriter(data)


class _Other:
    """The same pages under another object: the store cannot assume an earlier add."""

    def __init__(self, image: Image) -> None:
        self.page_count = image.page_count
        self.view = image.view


rounds = st.lists(st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(0, 255)),
                           max_size=30), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(rounds, st.integers(0, 20))
def test_adding_the_same_image_again_equals_a_pass_over_every_page(writes, seed) -> None:
    img = _image(seed)
    incremental, full = PageStore(), PageStore()
    incremental.add("vm/memory", img, build_index(img))
    full.add("vm/memory", img, build_index(img))
    for batch in writes:
        for page, byte in batch:
            if byte % 3:
                img.write(page, random.Random(byte * 7919 + page).randbytes(PAGE_SIZE))
            else:
                img.fill(page, 1, byte)  # uniform pages are never keyed
        ix = build_index(img)
        incremental.add("vm/memory", img, ix)
        full.add("vm/memory", _Other(img), ix)  # type: ignore[arg-type]
        assert incremental._pages == full._pages
        assert incremental.base("vm/memory").index is ix  # type: ignore[union-attr]
        for key, (slot, page) in incremental._pages.items():
            assert incremental._images[slot].index.fp(page)[: len(key)] == key
