"""HDE's compact diff: page keys, entries naming base pages, varint chunk ranges."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.core import Received, Send
from mesh.hde import PAGE_SIZE, ChunkError, Image, ImageWriter, PageStore, build_index
from mesh.hde.codec import compress, pack_ranges, to_ranges, unpack_ranges
from mesh.hde.entries import BASE, KEY, RUN, ReferenceMap, encode_entries, iter_entries
from mesh.hde.image import KEY_SIZE
from mesh.hde.loopback import run_transfer
from mesh.hde.messages import HdeBase, HdeFingerprints, HdeFingerprintsWant, HdeOffer
from mesh.hde.source import HdeSource
from mesh.hde.target import HdeTarget

P = PAGE_SIZE


def distinct(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(64) * (P // 64) for _ in range(n)]


def test_copied_runs_are_named_not_keyed() -> None:
    old = distinct(1024, 1)
    new = list(old)
    new[100:400] = old[600:900]  # a run of 300 pages copied within the image
    new[500] = b"new page".ljust(P, b"\x01")
    old_img, new_img = Image(b"".join(old)), Image(b"".join(new))
    old_ix, new_ix = build_index(old_img), build_index(new_img)
    figures = {}
    for with_index in (False, True):
        store = PageStore()
        store.add("vm", old_img, old_ix)
        r = run_transfer(image=new_img, index=new_ix, name="vm", store=store, level=3,
                         references={old_ix.root: old_img},
                         reference_indexes={old_ix.root: old_ix} if with_index else None)
        assert r.verified and bytes(r.image.view(0, 1024)) == b"".join(new)
        assert r.stats["pages_wanted"] == 1
        figures[with_index] = r.control_by_tag["hde.fps"]
    # 301 keys of 8 bytes against one BASE entry, 299 RUN tags and one key.
    assert figures[False] > 300 * KEY_SIZE
    assert figures[True] * 10 < figures[False]


@given(
    old=st.lists(st.integers(0, 30), min_size=1, max_size=80),
    new=st.lists(st.integers(0, 40), min_size=1, max_size=80),
)
def test_entries_round_trip_and_name_only_equal_pages(old: list[int], new: list[int]) -> None:
    """Every entry the source writes decodes to the page's key or to a base page whose full
    fingerprint equals the page's."""
    pages = distinct(41, 7)
    old_ix = build_index(Image(b"".join(pages[i] for i in old)))
    new_ix = build_index(Image(b"".join(pages[i] for i in new)))
    groups = [range(0, min(5, len(new))), range(min(5, len(new)), len(new))]
    listed = [p for r in groups for p in r]
    for ref in (None, ReferenceMap(old_ix)):
        data = encode_entries(new_ix, groups, ref)
        out = list(iter_entries(data, listed, old_ix.page_count))
        assert [p for p, _, _ in out] == listed
        for p, key, q in out:
            if key is not None:
                assert key == new_ix.fp(p)[:KEY_SIZE]
            else:
                assert ref is not None and q is not None and old_ix.fp(q) == new_ix.fp(p)
    if set(new) <= set(old):
        data = encode_entries(new_ix, groups, ReferenceMap(old_ix))
        assert KEY not in data[: len(listed)]  # every page is named in the base


@given(st.binary(max_size=200), st.lists(st.integers(0, 50), max_size=20),
       st.one_of(st.none(), st.integers(0, 60)))
def test_iter_entries_raises_only_chunk_error(data: bytes, pages: list[int],
                                              base_pages: int | None) -> None:
    try:
        for _, key, q in iter_entries(data, pages, base_pages):
            assert (key is None) != (q is None)
            if q is not None:
                assert base_pages is not None and 0 <= q < base_pages
            else:
                assert key is not None and len(key) == KEY_SIZE
    except ChunkError:
        pass


def test_entry_errors_name_the_problem() -> None:
    with pytest.raises(ChunkError, match="not started"):
        list(iter_entries(bytes([RUN]), [3], 10))
    with pytest.raises(ChunkError, match="lacks"):
        list(iter_entries(bytes([BASE, 0]), [3], None))
    with pytest.raises(ChunkError, match="lacks"):
        list(iter_entries(bytes([BASE, 2 * 20]), [3], 10))
    with pytest.raises(ChunkError, match="unknown entry tag"):
        list(iter_entries(bytes([9]), [3], 10))
    with pytest.raises(ChunkError, match="left after"):
        list(iter_entries(bytes([BASE, 0, 0]), [3], 10))
    with pytest.raises(ChunkError, match="inside a key"):
        list(iter_entries(bytes([KEY, 1, 2]), [3], 10))


def _target_mid_diff(base_img: Image | None, new_ix) -> HdeTarget:
    store = PageStore()
    if base_img is not None:
        store.add("vm", base_img, build_index(base_img))
    t = HdeTarget(7, "src", store, lambda n: ImageWriter(bytearray(n * P)))
    offer = HdeOffer(transfer=7, image="vm", page_count=new_ix.page_count, top=new_ix.top,
                     root=new_ix.root)
    t.handle(0.0, Received("src", offer))
    return t


def test_a_base_page_entry_without_a_base_fails_cleanly() -> None:
    new_ix = build_index(Image(b"".join(distinct(3, 2))))
    t = _target_mid_diff(None, new_ix)
    reply = HdeFingerprints(transfer=7, blocks=(0,), digests=new_ix.node(0, 0),
                            fps=compress(bytes([BASE, BASE, BASE, 0, 0, 0]), 1))
    t.handle(0.0, Received("src", reply))
    assert "lacks" in (t.failed or "")
    assert bytes(t.sink.view(0, 3)) == bytes(3 * P)  # nothing written


def test_a_refetched_block_gets_keys_only_and_refuses_base_pages() -> None:
    old = distinct(20, 3)
    new = old[5:] + old[:5]
    old_ix, new_ix = build_index(Image(b"".join(old))), build_index(Image(b"".join(new)))
    src = HdeSource(7, "dst", "vm", new_ix, {old_ix.root: None}, {old_ix.root: old_ix})
    src.start()
    src.handle(0.0, Received("dst", HdeBase(transfer=7, base_root=old_ix.root)))
    for plain in (False, True):
        want = HdeFingerprintsWant(transfer=7, blocks=(0,), masks=(3,), plain=plain)
        [send] = src.handle(0.0, Received("dst", want))
        assert isinstance(send, Send) and isinstance(send.message, HdeFingerprints)
        import zstandard

        tags = zstandard.ZstdDecompressor().decompress(send.message.fps)[:20]
        assert (set(tags) == {KEY}) == plain
    t = _target_mid_diff(Image(b"".join(old)), new_ix)
    t._strict = {0}  # as after a failed root check
    reply = HdeFingerprints(transfer=7, blocks=(0,), digests=new_ix.node(0, 0),
                            fps=compress(bytes([BASE] * 20 + [0] * 20), 1))
    t._outstanding[("fps", 0, (0,))] = ((3,), True)
    t.handle(0.0, Received("src", reply))
    assert "re-fetched block" in (t.failed or "")


@given(st.lists(st.integers(0, 2**40), max_size=60, unique=True))
def test_chunk_ranges_pack_and_unpack(pages: list[int]) -> None:
    ranges = to_ranges(sorted(pages))
    packed = pack_ranges(ranges)
    out, end = unpack_ranges(memoryview(packed), 0, len(ranges) // 2, 0)
    assert out == ranges and end == len(packed)


@given(st.binary(max_size=100), st.integers(0, 30))
def test_unpack_ranges_raises_only_chunk_error(data: bytes, n: int) -> None:
    try:
        out, end = unpack_ranges(memoryview(data), 0, n, 0)
    except ChunkError:
        return
    assert len(out) == 2 * n and end <= len(data) and all(c >= 1 for c in out[1::2])
