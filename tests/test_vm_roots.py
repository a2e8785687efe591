"""Roots kept current over what changed (federation.vms.roots): after any writes, a caught
up live index and a refreshed incoming index equal an index built from scratch, and the
refresh hashes only the changed blocks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.migration.round_events import CountDirty, DirtyCounted
from federation.vms.actions import VmActions
from federation.vms.backend import VmInfo, VmState
from federation.vms.dirty_scan import SentDigests
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


@settings(max_examples=30, deadline=None)
@given(st.lists(writes, min_size=1, max_size=4), st.integers(0, 10), st.booleans())
def test_a_live_index_started_from_a_shadow_copy_equals_one_built_from_scratch(
        rounds, seed, piecewise) -> None:
    """A v3 source's round 1 copies the image into its shadow, recording the copy's digests
    (SentDigests, whole or a piece at a time) and indexing the copy; the live index built
    from those (LiveIndex.of) and caught up after the guest wrote on counts the pages that
    changed since the copy and ends equal to an index of the live image."""
    img = _image(seed)
    copy = ImageWriter(bytearray(img.view(0, PAGES)))
    if piecewise:  # the copy's digests recorded as round 1 copies, 1,000 pages a slice
        sent = SentDigests.blank(PAGES)
        for first in range(0, PAGES, 1000):
            sent.read(first, copy.view(first, min(1000, PAGES - first)))
    else:
        sent = SentDigests(copy)
    live = LiveIndex.of(build_index(copy), sent.groups)
    for batch in rounds:
        for page, byte in batch:
            img.fill(page, 1, byte)
        changed = live.changed(img)
        # exactly the pages that differ from the copy the index last described
        assert changed == [p for p in range(PAGES) if bytes(img.view(p)) != bytes(copy.view(p))]
        assert live.catch_up(img) == len(changed)
        assert live.index.root == build_index(img).root
        assert live.changed(img) == []
        copy = ImageWriter(bytearray(img.view(0, PAGES)))


def test_a_live_index_needs_the_group_digests_of_its_pages() -> None:
    index = build_index(_image(0))
    with pytest.raises(ValueError, match="group digests"):
        LiveIndex.of(index, b"\0" * 8)


class _Guest:
    """A running VM tracked by content, over one memory image (a qemu guest's RAM file)."""

    def __init__(self, memory: bytearray) -> None:
        self.memory = memory

    def dirty_by_content(self, name: str) -> bool:
        return True

    def info(self, name: str) -> VmInfo:
        return VmInfo(name, 0, VmState.RUNNING, (("memory", PAGES),))

    def open_images(self, name: str) -> dict[str, ImageWriter]:
        return {"memory": ImageWriter(self.memory)}

    def dirty_since(self, name: str, mark: int) -> dict[str, list[int]]:
        raise AssertionError("round 1's count scans nothing beside the live index's catch-up")


def test_round_1s_count_starts_the_live_index_from_the_shadow_without_a_pass_of_its_own(
) -> None:
    memory = bytearray(_image(3).view(0, PAGES))
    copy = ImageWriter(bytearray(memory))  # the shadow round 1 copied
    sent = SentDigests(copy)
    guest = _Guest(memory)
    actions = VmActions(guest)  # type: ignore[arg-type]
    actions.shadow_digests = lambda mid: {"memory": (build_index(copy), bytes(sent.groups))}
    live = ImageWriter(memory)
    for p in (0, 9, BLOCK_PAGES + 1, PAGES - 1):  # the guest wrote on after the copy
        live.fill(p, 1, 0xAB)
    (counted,) = actions.carry_out_pages(CountDirty("m1", "vm1", 1, 0))
    assert isinstance(counted, DirtyCounted) and counted.pages == 4
    held = actions.live_indexes["m1"]["memory"]
    assert held.index.root == build_index(live).root
    assert held.rehashed == 3  # the three blocks written to, not all four
