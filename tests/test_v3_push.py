"""The pushed images of v3 rounds (federation.dataplane.v3_push): the source's offer and
chunks of what changed since the verified round, the target applying them in any order
and answering its recomputed root; a wrong base, a corrupted chunk, a chunk twice."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from federation.dataplane.v3_protocol import Overlay
from federation.dataplane.v3_push import (
    HeldPages,
    PushSource,
    PushTarget,
    V3PushOffer,
    differing_pages,
    is_push,
    push_plans,
    push_transfer,
)
from federation.dataplane.v3_shadow import read_pages
from mesh import wire
from mesh.core import Notify, Received, Send
from mesh.hde.codec import encode_chunk
from mesh.hde.events import ChunkArrived, EncodeChunk, RecomputeRoot, RootRecomputed
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.index import build_index
from mesh.hde.messages import CHUNK_PAGES, HdeVerified

PAGES = 600  # three 1 MiB blocks and a part, more than two chunks of changed pages


def _pair(seed: int, changed: list[int]) -> tuple[ImageWriter, ImageWriter, dict[int, bytes]]:
    """(the source's shadow after the round, the target's copy = the shadow before it, the
    old bytes of the changed pages)."""
    rng = random.Random(seed)
    base = bytearray(rng.randbytes(PAGES * PAGE_SIZE))
    shadow = ImageWriter(bytearray(base), "shadow")
    target = ImageWriter(bytearray(base), "target")
    old = {}
    for p in changed:
        old[p] = bytes(shadow.view(p))
        page = bytearray(shadow.view(p))
        for _ in range(rng.randint(1, 64)):  # a few bytes written in place: XOR-friendly
            page[rng.randrange(PAGE_SIZE)] = rng.randrange(256)
        if rng.random() < 0.2:
            page = bytearray(os.urandom(PAGE_SIZE))  # a page rewritten whole
        elif rng.random() < 0.3:
            q = rng.randrange(PAGES)  # a page moved: the target may hold it elsewhere
            page = bytearray(base[q * PAGE_SIZE : (q + 1) * PAGE_SIZE])
        shadow.write(p, bytes(page))
    return shadow, target, old


def _run(shadow: ImageWriter, target: ImageWriter, old: dict[int, bytes], order: random.Random,
         *, base: bytes | None = None, twice: bool = False, copies: bool = False
         ) -> tuple[PushSource, PushTarget, list[object]]:
    held = build_index(target)
    src = PushSource(0, "tgt", build_index(shadow), held.root if base is None else base,
                     sorted(old), HeldPages(held), copies=copies)
    dst = PushTarget(0, "src", target, held.root)
    acts = src.start()
    offer = acts[0]
    assert isinstance(offer, Send) and isinstance(offer.message, V3PushOffer)
    frames = []
    for e in acts[1:]:
        assert isinstance(e, EncodeChunk) and e.reference_root == src.base
        frames.append(encode_chunk(e.transfer, e.plan, shadow, Overlay(shadow, old), 1,
                                   copies=copies))
    # the offer crosses the control link, the chunks the AMST streams: any order
    events: list[object] = [Received("src", wire.decode(wire.encode(offer.message)), b"")]
    events += [ChunkArrived(src.transfer, i, f) for i, f in enumerate(frames)]
    if twice and frames:
        events.append(ChunkArrived(src.transfer, 0, frames[0]))
    order.shuffle(events)
    out: list[object] = []
    for ev in events:
        for a in dst.handle(0.0, ev):
            out.append(a)
            if isinstance(a, RecomputeRoot):
                ix = build_index(target)
                for b in dst.handle(0.0, RootRecomputed(a.transfer, bytes(ix.levels[0]), ix.root)):
                    out.append(b)
                    if isinstance(b, Send):
                        src.handle(0.0, Received("tgt", b.message, b""))
    return src, dst, out


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(0, PAGES - 1), max_size=3 * CHUNK_PAGES), st.integers(0, 2**32),
       st.booleans())
def test_a_pushed_image_arrives_whole_in_any_order(changed: set[int], seed: int,
                                                   copies: bool) -> None:
    shadow, target, old = _pair(seed, sorted(changed))
    src, dst, out = _run(shadow, target, old, random.Random(seed), twice=True, copies=copies)
    assert dst.failed is None and src.failed is None
    assert dst.verified and src.verified
    assert bytes(target.view(0, PAGES)) == bytes(shadow.view(0, PAGES))
    assert dst.stats["pages_wanted"] + dst.stats["pages_dedup"] == len(changed)
    assert dst.stats["pages_wanted"] == len(src.data)
    assert any(isinstance(a, Notify) and a.kind == "hde.verified" for a in out)


def test_a_push_against_a_base_the_target_does_not_hold_fails_with_the_reason() -> None:
    shadow, target, old = _pair(1, [3, 300])
    src, dst, out = _run(shadow, target, old, random.Random(1), base=b"\x07" * 32)
    assert dst.failed is not None and "base" in dst.failed
    assert not dst.verified and not src.verified
    assert any(isinstance(a, Notify) and a.kind == "hde.failed" for a in out)


def test_a_corrupted_chunk_fails_the_image() -> None:
    shadow, target, old = _pair(2, [5, 6, 7])
    held = build_index(target)
    dst = PushTarget(0, "src", target, held.root)
    src = PushSource(0, "tgt", build_index(shadow), held.root, sorted(old))
    enc = [a for a in src.start() if isinstance(a, EncodeChunk)]
    frame = bytearray(encode_chunk(enc[0].transfer, enc[0].plan, shadow, Overlay(shadow, old), 1))
    frame[-1] ^= 1
    acts = dst.handle(0.0, ChunkArrived(src.transfer, 0, frame))
    assert dst.failed is not None and "digest" in dst.failed
    assert [a.kind for a in acts if isinstance(a, Notify)] == ["hde.failed"]


def test_a_root_that_differs_is_answered_and_fails() -> None:
    shadow, target, old = _pair(3, [10])
    held = build_index(target)
    src = PushSource(0, "tgt", build_index(shadow), held.root, sorted(old))
    dst = PushTarget(0, "src", target, held.root)
    offer = src.start()[0]
    assert isinstance(offer, Send)
    # the chunk never comes; the offer says one: nothing to recompute yet
    assert dst.handle(0.0, Received("src", offer.message, b"")) == []
    # a chunk id the offer does not have
    bad = dst.handle(0.0, ChunkArrived(src.transfer, 5, b"x" * 64))
    assert dst.failed and "beyond" in dst.failed
    assert [a.kind for a in bad if isinstance(a, Notify)] == ["hde.failed"]
    # a source answered a verdict of another root fails too
    src2 = PushSource(0, "tgt", build_index(shadow), held.root, sorted(old))
    src2.start()
    src2.handle(0.0, Received("tgt", HdeVerified(transfer=src2.transfer, ok=True,
                                                 root=b"\1" * 32), b""))
    assert src2.verified is False


def test_nothing_changed_is_verified_without_chunks() -> None:
    shadow, target, old = _pair(4, [])
    src, dst, _ = _run(shadow, target, old, random.Random(4))
    assert src.verified and dst.verified and not dst.chunks


def test_transfer_ids_and_plans() -> None:
    assert is_push(push_transfer(0)) and push_transfer(2) & 0xFFFF == 3
    assert not is_push(3)
    plans = push_plans(list(range(0, 2 * CHUNK_PAGES + 1)))
    assert [p.chunk_id for p in plans] == [0, 1, 2]
    assert sum(p.count for p in plans) == 2 * CHUNK_PAGES + 1


def test_a_moved_page_goes_as_a_copy_from_a_page_the_round_leaves_alone() -> None:
    rng = random.Random(5)
    base = bytearray(rng.randbytes(PAGES * PAGE_SIZE))
    shadow = ImageWriter(bytearray(base), "shadow")
    target = ImageWriter(bytearray(base), "target")
    page = lambda q: bytes(base[q * PAGE_SIZE : (q + 1) * PAGE_SIZE])  # noqa: E731
    # 7 takes 100's content (100 unchanged: a copy); 8 takes 9's, but 9 changes too (data)
    old = {p: bytes(shadow.view(p)) for p in (7, 8, 9)}
    shadow.write(7, page(100))
    shadow.write(8, page(9))
    shadow.write(9, rng.randbytes(PAGE_SIZE))
    src, dst, _ = _run(shadow, target, old, random.Random(5))
    assert src.data == [8, 9] and len(src.copies) == 8
    assert src.verified and dst.verified and dst.stats["pages_dedup"] == 1
    assert bytes(target.view(0, PAGES)) == bytes(shadow.view(0, PAGES))


def test_held_pages_advance_stays_true_of_the_verified_content() -> None:
    shadow, target, old = _pair(6, list(range(0, PAGES, 7)))
    before, after = build_index(target), build_index(shadow)
    held = HeldPages(before)
    held.advance(before, after, sorted(old))
    for fp, p in held.by_fp.items():
        assert after.fp(p) == fp
    fresh = HeldPages(after)
    assert set(held.by_fp) <= set(fresh.by_fp)


def test_copies_out_of_bounds_fail() -> None:
    shadow, target, old = _pair(7, [1])
    held = build_index(target)
    dst = PushTarget(0, "src", target, held.root)
    bad = V3PushOffer(push_transfer(0), PAGES, held.root, held.root, 0, 0,
                      (5).to_bytes(4, "little") + (PAGES).to_bytes(4, "little"))
    acts = dst.handle(0.0, Received("src", bad, b""))
    assert dst.failed and "outside" in dst.failed
    assert [a.kind for a in acts if isinstance(a, Notify)] == ["hde.failed"]


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, PAGES - 1), max_size=40), st.integers(0, 2**32))
def test_differing_pages_are_the_pages_whose_content_changed(changed: set[int],
                                                             seed: int) -> None:
    shadow, target, _ = _pair(seed, sorted(changed))
    got = differing_pages(build_index(target), build_index(shadow))
    assert got == [p for p in range(PAGES)
                   if bytes(target.view(p)) != bytes(shadow.view(p))]


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, PAGES - 1), max_size=80))
def test_read_pages_reads_what_page_views_read(pages: set[int]) -> None:
    shadow, _, _ = _pair(8, [])
    got = read_pages(shadow, sorted(pages))
    assert got == {p: bytes(shadow.view(p)) for p in pages}


def test_equal_changed_pages_share_a_chunk_and_go_once_with_copies() -> None:
    """A round that writes one new page to 40 far-apart pages: with chunk copies (the
    target offered mesh.versions.HDE_COPIES) they share a chunk and its data goes once;
    without, they go in page order, each in full. Both arrive whole."""
    rng = random.Random(6)
    same = rng.randbytes(PAGE_SIZE)
    changed = list(range(0, PAGES, 15))[:40]
    sizes = {}
    for copies in (False, True):
        shadow, target, _ = _pair(6, [])
        old = {p: bytes(shadow.view(p)) for p in changed}
        for p in changed:
            shadow.write(p, same)
        src, dst, _ = _run(shadow, target, old, random.Random(6), copies=copies)
        assert src.verified and dst.verified and dst.stats["pages_wanted"] == len(changed)
        assert bytes(target.view(0, PAGES)) == bytes(shadow.view(0, PAGES))
        plans = [e.plan for e in src.start() if isinstance(e, EncodeChunk)]
        sizes[copies] = sum(len(encode_chunk(src.transfer, plan, shadow, None, 0,
                                             copies=copies)) for plan in plans)
    # stored (level 0): 40 pages against one page and 39 named copies
    assert sizes[False] > 40 * PAGE_SIZE and sizes[True] < 2 * PAGE_SIZE, sizes
