"""HDE chunks with copies: a page equal to an earlier page of its chunk is named, not sent
(mesh.hde.codec, flag _COPIES), and grouped_plans puts equal pages in one chunk."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hde.codec import (
    _COMPRESSED,
    _COPIES,
    _HEAD,
    _LEN,
    MAGIC,
    ChunkError,
    ChunkPlan,
    _digest,
    decode_chunk,
    encode_chunk,
    grouped_plans,
    pack_ranges,
    varints,
    xor_pages,
)
from mesh.hde.image import PAGE_SIZE, Image
from mesh.hde.messages import CHUNK_PAGES

P = PAGE_SIZE


def page(kind: int) -> bytes:
    """Kind 0 zero, 1-3 random, 4-5 text-like, 6 a random page with a few bytes changed."""
    if kind == 0:
        return bytes(P)
    if kind in (4, 5):
        return (b"page %d holds some text\n" % kind * 200)[:P]
    if kind == 6:
        p = bytearray(page(1))
        p[100:108] = b"changed!"
        return bytes(p)
    return random.Random(kind).randbytes(P)


def applied(frame: bytes | bytearray, count: int, reference: Image | None) -> bytes:
    """The pages a target writes from ``frame`` (XORed ones against ``reference``)."""
    d = decode_chunk(frame, 1, count)
    out = []
    for i in range(count):
        data = d.data[i * P : (i + 1) * P]
        if d.xor[i]:
            assert reference is not None
            data = xor_pages(data, reference.view(d.pages[i]))
        out.append(bytes(data))
    return b"".join(out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=24), st.sampled_from([0, 1, 3, 13]),
       st.sampled_from(["none", "zero", "same", "random"]))
def test_copies_round_trip_any_chunk(kinds: list[int], level: int, ref: str) -> None:
    img = Image(b"".join(page(k) for k in kinds))
    n = len(kinds)
    reference = {"none": None, "zero": Image(bytes(n * P)), "same": img,
                 "random": Image(b"".join(page(1 + i % 3) for i in range(n)))}[ref]
    plan = ChunkPlan.of_pages(0, range(n))
    frame = encode_chunk(1, plan, img, reference, level, copies=True)
    assert applied(frame, n, reference) == bytes(img.view(0, n))


def test_each_distinct_page_goes_once() -> None:
    kinds = [1, 2, 1, 3, 2, 1, 0, 0]
    img = Image(b"".join(page(k) for k in kinds))
    plan = ChunkPlan.of_pages(0, range(len(kinds)))
    with_copies = encode_chunk(1, plan, img, None, 0, copies=True)
    without = encode_chunk(1, plan, img, None, 0)
    assert len(without) - len(with_copies) > 4 * P - 20  # 4 repeats not stored
    assert len(with_copies) < 4 * P + 100
    assert applied(with_copies, len(kinds), None) == bytes(img.view(0, len(kinds)))
    # no repeat: the frame is the one without copies, byte for byte
    plain = Image(b"".join(page(k) for k in (1, 2, 3)))
    p3 = ChunkPlan.of_pages(0, range(3))
    assert encode_chunk(1, p3, plain, None, 1, copies=True) == encode_chunk(1, p3, plain, None, 1)


def test_a_page_whose_xor_pays_still_goes_xored_with_its_equals() -> None:
    """Random pages with a few bytes changed in place, twice: XOR (the frame's usual
    gain for in-place writes) wins over naming the second as a copy of the first."""
    kinds = [6, 6]
    img = Image(page(6) * 2)
    reference = Image(page(1) * 2)
    plan = ChunkPlan.of_pages(0, range(2))
    frame = encode_chunk(1, plan, img, reference, 3, copies=True)
    assert decode_chunk(frame, 1, 2).xor == (True, True)
    assert len(frame) < 200
    assert applied(frame, len(kinds), reference) == bytes(img.view(0, 2))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=700))
def test_grouped_plans_cover_every_page_once_and_keep_equals_together(kinds: list[int]) -> None:
    small = [random.Random(k).randbytes(64) * (P // 64) for k in range(13)]
    img = Image(b"".join(small[k] for k in kinds))
    pages = list(range(0, len(kinds), 2)) + list(range(1, len(kinds), 2))
    plans = grouped_plans(img, pages, first_id=5)
    assert [p.chunk_id for p in plans] == list(range(5, 5 + len(plans)))
    flat = [p for plan in plans for p in plan.pages]
    assert sorted(flat) == sorted(pages) and all(0 < plan.count <= CHUNK_PAGES for plan in plans)
    chunk_of = {p: plan.chunk_id for plan in plans for p in plan.pages}
    for k in set(kinds):
        where = {chunk_of[p] for p in pages if kinds[p] == k}
        count = sum(1 for x in kinds if x == k)
        assert len(where) <= -(-count // CHUNK_PAGES) + 1


def test_a_round_of_repeated_pages_sends_fewer_bytes_grouped_with_copies() -> None:
    """A round whose pages repeat far apart (a buffer and the file written from it)."""
    rng = random.Random(3)
    fresh = [rng.randbytes(P) for _ in range(300)]
    kinds = list(range(300)) + list(range(300))  # every page twice, 300 pages apart
    img = Image(b"".join(fresh[k] for k in kinds))
    pages = list(range(len(kinds)))
    sorted_plans = [ChunkPlan.of_pages(i // CHUNK_PAGES, pages[i : i + CHUNK_PAGES])
                    for i in range(0, len(pages), CHUNK_PAGES)]
    before = sum(len(encode_chunk(1, p, img, None, 1)) for p in sorted_plans)
    plans = grouped_plans(img, pages)
    after = sum(len(encode_chunk(1, p, img, None, 1, copies=True)) for p in plans)
    assert after < 0.55 * before
    for plan in plans:
        frame = encode_chunk(1, plan, img, None, 1, copies=True)
        d = decode_chunk(frame, 1, img.page_count)
        assert d.data == b"".join(bytes(img.view(p)) for p in plan.pages)


# --------------------------------------------------------------------------- decoder


def frame_of(pairs: list[int], count: int = 4, xor: int = 0, sent: int | None = None,
             flags: int = _COPIES, npairs: int | None = None) -> bytes:
    """A copies frame with a valid digest: ``pairs`` flattened (copy, original)."""
    ranges = [0, count]
    sent = count - len(pairs) // 2 if sent is None else sent
    payload = b"".join(random.Random(i).randbytes(P) for i in range(sent))
    head = b"".join([_HEAD.pack(MAGIC, 1, 0, flags, 1), pack_ranges(ranges),
                     bytes([xor]), varints([len(pairs) // 2 if npairs is None else npairs,
                                            *pairs]),
                     _LEN.pack(len(payload))])
    return head + _digest(head, payload) + payload


def test_a_well_formed_copies_frame_decodes() -> None:
    d = decode_chunk(frame_of([2, 0, 3, 1]), 1, 10)
    pages = [d.data[i * P : (i + 1) * P] for i in range(4)]
    assert pages[2] == pages[0] and pages[3] == pages[1] and pages[0] != pages[1]


@pytest.mark.parametrize("pairs,xor,why", [
    ([1, 1], 0, "copy of itself"),
    ([1, 2], 0, "copy of a later page"),
    ([3, 0, 2, 0], 0, "copies not ascending"),
    ([2, 1, 3, 2], 0, "copy of a copy"),
    ([4, 0], 0, "copy past the chunk"),
    ([2, 0], 0b0001, "copy of an XORed page"),
    ([2, 0], 0b0100, "an XORed copy"),
])
def test_bad_copies_are_refused_with_a_reason(pairs: list[int], xor: int, why: str) -> None:
    with pytest.raises(ChunkError, match="copies"):
        decode_chunk(frame_of(pairs, xor=xor), 1, 10)


def test_copy_counts_and_payload_sizes_are_checked() -> None:
    with pytest.raises(ChunkError, match="copies"):
        decode_chunk(frame_of([], npairs=0), 1, 10)  # the flag with no copy
    with pytest.raises(ChunkError, match="copies"):
        decode_chunk(frame_of([1, 0, 2, 0, 3, 0], npairs=4), 1, 10)
    with pytest.raises(ChunkError, match="bytes for"):
        decode_chunk(frame_of([1, 0], sent=2), 1, 10)  # payload one page short
    with pytest.raises(ChunkError):
        decode_chunk(frame_of([1, 0], flags=_COPIES | _COMPRESSED), 1, 10)  # not zstd


_VALID = encode_chunk(1, ChunkPlan.of_pages(0, range(6)),
                      Image(b"".join(page(k) for k in (1, 4, 1, 2, 4, 1))), None, 1,
                      copies=True)


def test_the_fixture_carries_copies() -> None:
    assert _VALID[_HEAD.size - 3] & _COPIES


@given(st.integers(0, len(_VALID) - 1), st.integers(1, 255), st.integers(0, 3))
def test_mutated_copies_frames_are_refused(pos: int, flip: int, cut: int) -> None:
    frame = bytearray(_VALID)
    frame[pos] ^= flip
    with pytest.raises(ChunkError):
        decode_chunk(bytes(frame[: len(frame) - cut]), 1, 1000)


@given(st.binary(max_size=64), st.binary(max_size=3000))
def test_copies_header_with_any_tail_raises_only_chunk_error(copies: bytes,
                                                             tail: bytes) -> None:
    head = _HEAD.pack(MAGIC, 1, 0, _COPIES, 1) + pack_ranges([0, 4]) + bytes(1)
    try:
        decode_chunk(head + copies + tail, 1, 10)
    except ChunkError:
        pass
