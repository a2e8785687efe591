"""Roots kept current over what changed (federation.vms.roots): after any writes, a caught
up live index and a refreshed incoming index equal an index built from scratch, and the
refresh hashes only the changed blocks."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.vms.roots import IncomingIndexes, LiveIndex, snapshot_index
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.index import BLOCK_PAGES, build_index

PAGES = 3 * BLOCK_PAGES + 17


def _image(seed: int) -> ImageWriter:
    rng = random.Random(seed)
    data = bytearray(PAGES * PAGE_SIZE)
    for p in range(0, PAGES, 3):
        data[p * PAGE_SIZE : p * PAGE_SIZE + 64] = rng.randbytes(64)
    return ImageWriter(data)


writes = st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(0, 255)), max_size=40)


@settings(max_examples=30, deadline=None)
@given(st.lists(writes, min_size=1, max_size=4), st.integers(0, 10), st.booleans())
def test_a_live_index_caught_up_equals_one_built_from_scratch(rounds, seed, stopped) -> None:
    img = _image(seed)
    live = LiveIndex(img)
    assert live.index.root == build_index(img).root == snapshot_index(img).root
    for batch in rounds:
        for page, byte in batch:
            img.fill(page, 1, byte)
        changed = live.changed(img)
        # stopped (a fenced guest): read in place, no snapshot copies
        assert live.catch_up(img, stopped=stopped) == len(changed)
        assert live.index.root == build_index(img).root
        assert live.changed(img) == []
        assert live.groups == LiveIndex(img).groups  # the scan's digests, kept


def test_a_page_that_changes_and_changes_back_leaves_the_index_right() -> None:
    img = _image(1)
    live = LiveIndex(img)
    before = bytes(img.view(5))
    img.fill(5, 1, 7)
    live.catch_up(img)  # indexed while it held B
    img.write(5, before)  # and back to A: the fingerprint differs from the index's
    assert live.changed(img) == [5]
    live.catch_up(img)
    assert live.index.root == build_index(img).root


@settings(max_examples=30, deadline=None)
@given(st.lists(writes, min_size=1, max_size=4), st.integers(0, 10))
def test_an_incoming_index_refreshed_equals_one_built_from_scratch(rounds, seed) -> None:
    img = _image(seed)
    roots = IncomingIndexes()
    first = roots.index("memory", img)
    for batch in rounds:
        for page, byte in batch:
            img.fill(page, 1, byte)
        ix = roots.index("memory", img)
        assert ix.root == build_index(img).root
    # an index handed out earlier stays as it was (it is a round's base)
    assert first.root == build_index(_image(seed)).root
