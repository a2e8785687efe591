"""A transfer into the image that is its own base (a migration target writing over the copy
it kept): in-place pages are not rewritten, and the root is refreshed over what was
written (run_transfer's ``sink_index``)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hde.image import PAGE_SIZE, Image, ImageWriter
from mesh.hde.index import BLOCK_PAGES, build_index
from mesh.hde.loopback import run_transfer
from mesh.hde.store import PageStore

P = PAGE_SIZE


def old_and_new(seed: int, pages: int, changes: list[tuple[int, int]]) -> tuple[bytes, bytes]:
    """An old image of random pages, and a new one with ``changes`` (page, source page:
    -1 fresh random data, else a copy of the old image's page) applied."""
    rng = random.Random(seed)
    old = bytearray(rng.randbytes(pages * P))
    new = bytearray(old)
    for p, q in changes:
        new[p * P : (p + 1) * P] = rng.randbytes(P) if q < 0 else old[q * P : (q + 1) * P]
    return bytes(old), bytes(new)


def move(old: bytes, new: bytes, own_base: bool) -> tuple[bytes, int, set[int] | None]:
    img = Image(new)
    writer = ImageWriter(bytearray(old), "incoming")
    store = PageStore()
    base_ix = build_index(writer)
    store.add("vm", writer, base_ix)
    r = run_transfer(image=img, index=build_index(img), name="vm", store=store, level=1,
                     make_sink=lambda _n: writer, sink_index=base_ix if own_base else None)
    assert r.verified, r.failure
    return bytes(writer.view(0, writer.page_count)), r.wire_bytes, writer.written


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 3 * BLOCK_PAGES),
       st.lists(st.tuples(st.integers(0, 3 * BLOCK_PAGES - 1), st.integers(-1, 40)),
                max_size=40))
def test_a_target_that_is_its_own_base_ends_with_the_new_image(seed, pages, changes) -> None:
    changes = [(p % pages, q % pages if q >= 0 else -1) for p, q in changes]
    old, new = old_and_new(seed, pages, changes)
    got, _, written = move(old, new, True)
    assert got == new
    assert written is not None
    differ = {p for p in range(pages) if old[p * P : (p + 1) * P] != new[p * P : (p + 1) * P]}
    assert written == differ  # every page that differs, and only those, was written


def test_only_changed_pages_are_written_and_the_bytes_are_the_same() -> None:
    changes = [(3, -1), (300, 5), (301, -1), (700, 700)]
    old, new = old_and_new(1, 3 * BLOCK_PAGES, changes)
    got, wire_own, written = move(old, new, True)
    assert got == new and written == {3, 300, 301}
    got2, wire_full, written2 = move(old, new, False)
    assert got2 == new and written2 is None and wire_own == wire_full
