"""Round 1 streamed to a cold target (federation.dataplane.v3_push.StreamSource, V3Held;
the source's decision in federation.dataplane.v3_source._Stream): the chunks of each piece
as it is read, the offer with the root at the end, the target verifying as strictly as
for any pushed image; a target that holds anything else gets the round diffed."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.dataplane.v3_protocol import ChunkFeed, Overlay
from federation.dataplane.v3_push import (
    PushTarget,
    StreamSource,
    V3Held,
    V3PushOffer,
    nonzero_pages,
    push_transfer,
)
from federation.dataplane.v3_source import _Stream
from mesh import wire
from mesh.core import Notify, Received, Send
from mesh.hde.codec import encode_chunk
from mesh.hde.events import ChunkArrived, EncodeChunk, RecomputeRoot, RootRecomputed
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.index import build_index, zero_index
from mesh.hde.messages import CHUNK_PAGES, HdeVerified

PAGES = 700  # two 1 MiB blocks and a part
PIECE = 160  # pages read at once (the copy's pieces; not whole chunks, on purpose)


def _guest(seed: int, zero: float) -> ImageWriter:
    """An image of PAGES pages, a share ``zero`` of them zero pages, in runs and alone."""
    rng = random.Random(seed)
    data = bytearray(PAGES * PAGE_SIZE)
    for p in range(PAGES):
        if rng.random() >= zero:
            data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    return ImageWriter(data, "shadow")


def _stream(image: ImageWriter) -> tuple[StreamSource, list[list[EncodeChunk]], Send]:
    """The source's side: the chunks planned per piece as the image is read, then the
    offer."""
    src = StreamSource(0, "tgt", image.page_count, zero_index(image.page_count).root)
    pieces = []
    for first in range(0, image.page_count, PIECE):
        n = min(PIECE, image.page_count - first)
        pieces.append(src.add(nonzero_pages(first, bytes(image.view(first, n)))))
    (offer,) = src.finish(build_index(image))
    return src, pieces, offer


def _deliver(src: StreamSource, dst: PushTarget, target: ImageWriter,
             events: list[Any]) -> list[object]:
    out: list[object] = []
    for ev in events:
        for a in dst.handle(0.0, ev):
            out.append(a)
            if isinstance(a, RecomputeRoot):
                ix = build_index(target)
                for b in dst.handle(0.0, RootRecomputed(a.transfer, bytes(ix.levels[0]),
                                                        ix.root)):
                    out.append(b)
                    if isinstance(b, Send):
                        out.extend(src.handle(0.0, Received("tgt", b.message, b"")))
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([0.0, 0.3, 0.9, 1.0]), st.integers(0, 2**32))
def test_a_streamed_image_arrives_whole_with_its_offer_last_or_anywhere(
        seed: int, zero: float, order_seed: int) -> None:
    shadow = _guest(seed, zero)
    src, pieces, offer = _stream(shadow)
    target = ImageWriter(bytearray(PAGES * PAGE_SIZE), "target")  # cold: zero pages
    dst = PushTarget(0, "src", target, build_index(target).root)
    frames = [ChunkArrived(e.transfer, e.plan.chunk_id, encode_chunk(
        e.transfer, e.plan, Overlay(shadow, {}), None, 3))
        for piece in pieces for e in piece]
    assert [f.chunk_id for f in frames] == list(range(len(frames)))
    # every chunk holds only the non-zero pages, at most CHUNK_PAGES of them
    assert all(e.reference_root is None and 0 < e.plan.count <= CHUNK_PAGES
               for piece in pieces for e in piece)
    msg = wire.decode(wire.encode(offer.message))
    assert isinstance(msg, V3PushOffer) and msg.chunks == len(frames)
    assert msg.pages == sum(1 for p in range(PAGES) if any(shadow.view(p)))
    events: list[object] = [*frames, Received("src", msg, b"")]
    order = random.Random(order_seed)
    if order.random() < 0.5:
        order.shuffle(events)  # AMST's streams and the control link: any order
    out = _deliver(src, dst, target, events)
    assert dst.failed is None and src.failed is None, (dst.failed, src.failed)
    assert dst.verified and src.verified
    assert bytes(target.view(0, PAGES)) == bytes(shadow.view(0, PAGES))
    assert any(isinstance(a, Notify) and a.kind == "hde.verified" for a in out)


def test_a_missing_chunk_leaves_the_image_unverified_and_a_wrong_one_fails_it() -> None:
    shadow = _guest(5, 0.3)
    src, pieces, offer = _stream(shadow)
    chunks = [e for piece in pieces for e in piece]
    target = ImageWriter(bytearray(PAGES * PAGE_SIZE), "target")
    dst = PushTarget(0, "src", target, build_index(target).root)
    frames = [encode_chunk(e.transfer, e.plan, shadow, None, 1) for e in chunks]
    # all but the last: the offer's count is not in, nothing is recomputed or verified
    out = _deliver(src, dst, target, [ChunkArrived(src.transfer, i, f)
                                      for i, f in enumerate(frames[:-1])]
                   + [Received("src", offer.message, b"")])
    assert out == [] and not dst.verified and dst.failed is None
    # the last one corrupted: the image fails with the reason
    bad = bytearray(frames[-1])
    bad[-1] ^= 1
    out = _deliver(src, dst, target, [ChunkArrived(src.transfer, len(frames) - 1, bad)])
    assert dst.failed is not None and not dst.verified
    assert [a.kind for a in out if isinstance(a, Notify)] == ["hde.failed"]


def test_a_root_that_differs_fails_at_both_ends() -> None:
    shadow = _guest(6, 0.5)
    src, pieces, _ = _stream(shadow)
    # the source offers the root of other content than it streamed
    other = ImageWriter(bytearray(shadow.view(0, PAGES)), "other")
    other.write(3, os.urandom(PAGE_SIZE))
    src2 = StreamSource(0, "tgt", PAGES, zero_index(PAGES).root)
    for piece in pieces:
        for e in piece:
            src2.add(list(e.plan.pages))
    (offer,) = src2.finish(build_index(other))
    target = ImageWriter(bytearray(PAGES * PAGE_SIZE), "target")
    dst = PushTarget(0, "src", target, build_index(target).root)
    events: list[object] = [ChunkArrived(e.transfer, e.plan.chunk_id,
                                         encode_chunk(e.transfer, e.plan, shadow, None, 1))
                            for piece in pieces for e in piece]
    out = _deliver(src2, dst, target, [*events, Received("src", offer.message, b"")])
    assert dst.failed is not None and "root" in dst.failed and not dst.verified
    assert src2.verified is False
    assert any(isinstance(a, Send) and isinstance(a.message, HdeVerified) and not a.message.ok
               for a in out)


def test_a_target_that_holds_something_refuses_the_zero_base() -> None:
    shadow = _guest(7, 0.2)
    src, pieces, offer = _stream(shadow)
    target = ImageWriter(bytearray(random.Random(1).randbytes(PAGES * PAGE_SIZE)), "warm")
    dst = PushTarget(0, "src", target, build_index(target).root)
    out = _deliver(src, dst, target, [Received("src", offer.message, b"")])
    assert dst.failed is not None and "base" in dst.failed
    assert [a.kind for a in out if isinstance(a, Notify)] == ["hde.failed"]


def test_stream_source_bounds() -> None:
    src = StreamSource(1, "tgt", 10, zero_index(10).root)
    assert src.transfer == push_transfer(1)
    with pytest.raises(ValueError, match="outside"):
        src.add([3, 10])
    assert src.add([]) == [] and src.chunks == 0
    with pytest.raises(ValueError, match="pages"):
        src.finish(zero_index(11))
    src.finish(zero_index(10))
    with pytest.raises(ValueError, match="after its offer"):
        src.add([1])
    # an answer before the offer, or of another kind, fails the image with the reason
    early = StreamSource(0, "tgt", 10, zero_index(10).root)
    acts = early.handle(0.0, Received("tgt", HdeVerified(transfer=early.transfer, ok=True,
                                                         root=b"\0" * 32), b""))
    assert early.failed is not None and [a.kind for a in acts] == ["hde.failed"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3 * CHUNK_PAGES + 5),
       st.integers(0, 10**6))
def test_nonzero_pages_are_the_pages_not_all_zeros(kinds: list[int], first: int) -> None:
    """0: a zero page; 1: one byte set somewhere; 2: random."""
    rng = random.Random(len(kinds))
    data = bytearray(len(kinds) * PAGE_SIZE)
    for i, k in enumerate(kinds):
        if k == 1:
            data[i * PAGE_SIZE + rng.randrange(PAGE_SIZE)] = 1 + rng.randrange(255)
        elif k == 2:
            data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    want = [first + i for i, k in enumerate(kinds) if k and any(
        data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])]
    assert nonzero_pages(first, bytes(data)) == want


@given(st.binary(max_size=200))
def test_v3_held_decoder_refuses_junk_with_a_wire_error(raw: bytes) -> None:
    try:
        msg = wire.decode(raw)
    except wire.WireError:
        return
    assert msg is not None


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(min_size=32,
                                                                       max_size=32))
def test_v3_held_round_trips_and_checks_its_root(transfer: int, pages: int,
                                                 root: bytes) -> None:
    msg = V3Held(transfer, pages, root)
    assert wire.decode(wire.encode(msg)) == msg
    bad = wire.encode(msg).replace(root, root[:31]) if root in wire.encode(msg) else None
    if bad is not None:
        with pytest.raises(wire.WireError):
            wire.decode(bad)


# ---------------------------------------------------------------- the source's decision


def _held(i: int, count: int, root: bytes) -> V3Held:
    return V3Held(push_transfer(i), count, root)


def test_the_source_streams_only_when_every_image_is_held_cold() -> None:
    async def main() -> None:
        s = _Stream()
        s.layout = [("disk", 8), ("memory", 512)]
        assert not s.cold()  # nothing heard (an older target says nothing)
        s.hear(1, _held(1, 512, zero_index(512).root))
        assert not s.cold() and not s.declined
        s.hear(0, _held(0, 8, zero_index(8).root))
        assert s.cold()
        # a second word on an image does not change the decision
        s.hear(0, _held(0, 8, b"\1" * 32))
        assert s.cold()

        warm = _Stream()
        warm.layout = [("disk", 8), ("memory", 512)]
        warm.hear(0, _held(0, 8, zero_index(8).root))
        warm.hear(1, _held(1, 512, b"\7" * 32))  # an old copy: the round is diffed
        assert warm.declined and not warm.cold() and warm.scope.cancel_called
        # ... and a page count that is not the image's is not cold either
        odd = _Stream()
        odd.layout = [("memory", 512)]
        odd.hear(0, _held(0, 511, zero_index(511).root))
        assert odd.declined

    trio.run(main)


def test_pieces_read_before_the_word_are_planned_at_it_in_order() -> None:
    async def main() -> None:
        s = _Stream()
        s.layout = [("memory", PAGES)]
        image = _guest(9, 0.4)
        data = bytes(image.view(0, PAGES))
        cut = CHUNK_PAGES * PAGE_SIZE
        s.copied("memory", 0, data[:cut])
        s.copied("memory", CHUNK_PAGES, data[cut : 2 * cut])
        src = StreamSource(0, "tgt", PAGES, zero_index(PAGES).root)
        feed = ChunkFeed(lambda i, e, lvl: b"", 1)
        s.begin({"memory": src}, feed)
        s.copied("memory", 2 * CHUNK_PAGES, data[2 * cut :])
        planned = []
        while not feed._queue.empty():
            item = feed._queue.get_nowait()
            assert item is not None
            planned.extend(item[1].plan.pages)
        assert planned == nonzero_pages(0, data)
        # a declined stream keeps nothing
        d = _Stream()
        d.layout = [("memory", CHUNK_PAGES)]
        d.decline()
        d.copied("memory", 0, data[: CHUNK_PAGES * PAGE_SIZE])
        assert d._pending == [] and d.sources is None

    trio.run(main)


def test_beyond_its_lead_the_stream_plans_pages_grouped_at_the_copy_end() -> None:
    async def main() -> None:
        s = _Stream()
        s.layout = [("memory", PAGES)]
        image = _guest(10, 0.0)
        data = bytes(image.view(0, PAGES))
        src = StreamSource(0, "tgt", PAGES, zero_index(PAGES).root)
        feed = ChunkFeed(lambda i, e, lvl: b"", 1)
        s.begin({"memory": src}, feed, lead=100)
        s.copied("memory", 0, data[: PIECE * PAGE_SIZE])
        s.copied("memory", PIECE, data[PIECE * PAGE_SIZE :])

        def planned() -> list[list[int]]:
            out = []
            while not feed._queue.empty():
                item = feed._queue.get_nowait()
                assert item is not None
                out.append(item[1].plan.pages)
            return out

        assert planned() == [list(range(100))]  # the lead, in the order read
        # the rest by key: pages of equal key (p % 3) together, each chunk ascending
        assert s.plan_rest({"memory": lambda p: p % 3}) == PAGES - 100
        rest = planned()
        assert sorted(p for c in rest for p in c) == list(range(100, PAGES))
        assert all(len({p % 3 for p in c}) <= 2 for c in rest)
        assert {p % 3 for p in rest[0]} == {100 % 3}
        (offer,) = src.finish(build_index(image))
        assert isinstance(offer.message, V3PushOffer)
        assert offer.message.chunks == 1 + len(rest) and offer.message.pages == PAGES

    trio.run(main)
