"""A target with no base (an empty DC's first copy of an image): it compares the source's
tree with an all-zero image's, so a zero subtree costs nothing and only blocks with data
have their page keys listed; the result is the source's image, on a new (zero) sink or
on one holding other bytes."""

from __future__ import annotations

import mmap
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import wire
from mesh.hde.image import PAGE_SIZE, Image, ImageWriter
from mesh.hde.index import BLOCK_PAGES, FANOUT, build_index, zero_index, zero_node
from mesh.hde.loopback import Frame, memory_sink, run_transfer
from mesh.hde.messages import HdeFingerprintsWant
from mesh.hde.store import PageStore

TEXT = open(__file__, "rb").read()


def _image(pages: int, writes: list[tuple[int, int]]) -> Image:
    buf = bytearray(pages * PAGE_SIZE)
    for i, (page, count) in enumerate(writes):
        count = min(count, pages - page)
        data = (TEXT[i:] + TEXT) * (count * PAGE_SIZE // len(TEXT) + 2)
        buf[page * PAGE_SIZE:(page + count) * PAGE_SIZE] = data[:count * PAGE_SIZE]
    return Image(bytes(buf), "src")


def _listed_blocks(image: Image, make_sink=memory_sink) -> tuple[set[int], object]:  # type: ignore[no-untyped-def]
    """Transfer ``image`` to an empty target; the blocks whose page keys it asked for."""
    asked: set[int] = set()

    def carry(frames: Iterable[Frame], to_target: bool) -> list[Frame]:
        out = list(frames)
        for f in out if not to_target else ():
            if wire.peek_tag(bytes(f)) == "hde.fps_want":
                asked.update(wire.decode(bytes(f), expect=(HdeFingerprintsWant,)).blocks)
        return out

    result = run_transfer(image=image, index=build_index(image), name="disk",
                          store=PageStore(), level=1, make_sink=make_sink, carry=carry)
    assert result.verified, result.failure
    assert result.image is not None
    assert bytes(result.image.view(0, image.page_count)) == bytes(image.view(0, image.page_count))
    return asked, result


def test_only_blocks_with_data_are_listed() -> None:
    pages = 3 * FANOUT * BLOCK_PAGES  # 48 blocks under 3 full level-1 nodes
    # data in blocks 5 and 40 (crossing into 41)
    image = _image(pages, [(5 * BLOCK_PAGES + 3, 10), (41 * BLOCK_PAGES - 2, 4)])
    asked, result = _listed_blocks(image)
    assert asked == {5, 40, 41}  # not the 48 blocks a page-by-page walk lists
    assert result.stats["pages_uniform"] >= pages - 3 * BLOCK_PAGES  # type: ignore[attr-defined]


def test_an_all_zero_image_costs_no_listing() -> None:
    asked, _ = _listed_blocks(Image(bytes(FANOUT * BLOCK_PAGES * PAGE_SIZE), "zero"))
    assert asked == set()


def test_a_sink_holding_other_bytes_is_filled_with_the_zero_blocks() -> None:
    pages = 2 * FANOUT * BLOCK_PAGES + 5  # a partial last block and node
    image = _image(pages, [(BLOCK_PAGES, 3), (pages - 3, 3)])

    def dirty_sink(n: int) -> ImageWriter:
        m = mmap.mmap(-1, n * PAGE_SIZE)
        m[:] = b"\xa5" * (n * PAGE_SIZE)  # not zero: not a new image (zeroed stays False)
        return ImageWriter(m, "dirty")

    asked, _ = _listed_blocks(image, dirty_sink)
    # the partial last block (and its partial parents) is compared the long way
    assert asked == {1, 2 * FANOUT}


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2 * FANOUT * BLOCK_PAGES),
       st.lists(st.tuples(st.integers(0, 2 * FANOUT * BLOCK_PAGES), st.integers(1, 300)),
                max_size=4))
def test_any_sparse_image_arrives_whole(pages: int, writes: list[tuple[int, int]]) -> None:
    image = _image(pages, [(p, c) for p, c in writes if p < pages])
    asked, _ = _listed_blocks(image)
    with_data = {p // BLOCK_PAGES for p in range(pages)
                 if any(image.view(p))}
    last = (pages - 1) // BLOCK_PAGES
    assert with_data <= asked <= with_data | {last}


@given(st.integers(1, 40 * BLOCK_PAGES))
def test_the_zero_index_is_the_index_of_zero_pages(pages: int) -> None:
    built = build_index(Image(bytes(pages * PAGE_SIZE), "z"))
    zero = zero_index(pages)
    assert (zero.root, zero.fps, [bytes(lv) for lv in zero.levels]) == (
        built.root, built.fps, [bytes(lv) for lv in built.levels])
    for level, nodes in enumerate(built.levels):
        for i in range(len(nodes) // 32):
            z = zero_node(level, i, pages)
            assert z is None or z == built.node(level, i)
            assert (z is None) == ((i + 1) * FANOUT**level * BLOCK_PAGES > pages)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4 * BLOCK_PAGES),
       st.lists(st.tuples(st.integers(0, 4 * BLOCK_PAGES), st.integers(1, 40)), max_size=5))
def test_the_store_holds_the_keys_a_walk_over_every_page_finds(
        pages: int, writes: list[tuple[int, int]]) -> None:
    from mesh.hde.image import FP_SIZE, KEY_SIZE, UNIFORM_KEY

    image = _image(pages, [(p, c) for p, c in writes if p < pages])
    ix = build_index(image)
    store = PageStore()
    store.add("disk", image, ix)
    walk = {}
    for p in range(pages):
        key = bytes(ix.fps[p * FP_SIZE:p * FP_SIZE + KEY_SIZE])
        if key not in walk and key not in UNIFORM_KEY:
            walk[key] = p
    assert {k: store.lookup(k)[1] for k in walk} == walk  # type: ignore[index]
    assert len(store) == len(walk)
