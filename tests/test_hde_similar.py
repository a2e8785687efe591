"""HDE chunks by similarity (mesh.hde.similar): sketches, grouping, and transfers with it."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hde.image import PAGE_SIZE, Image, PageSource
from mesh.hde.index import build_index
from mesh.hde.loopback import run_transfer
from mesh.hde.messages import CHUNK_PAGES
from mesh.hde.similar import LEAD_PAGES, group_chunks, page_sketches, sketch
from mesh.hde.source import GROUP_WINDOW
from mesh.hde.store import PageStore
from mesh.hde.target import MAX_WANTED_PAGES

P = PAGE_SIZE


def text(seed: int, n: int) -> bytes:
    """``n`` bytes of lines of random hex numbers."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += b" ".join(b"%x" % rng.getrandbits(32) for _ in range(8)) + b"\n"
    return bytes(out[:n])


def test_a_shifted_copy_keeps_its_sketch_and_unrelated_pages_differ() -> None:
    t = text(1, 2 * P)
    assert sketch(t[:P]) == sketch(t[7 : P + 7]) is not None
    assert sketch(t[:P]) != sketch(text(2, P))
    assert sketch(bytes(P)) is None and sketch(b"\xff" * P) is None


def test_a_sparse_page_is_not_named_by_its_runs_of_zeros() -> None:
    a = bytearray(P)
    b = bytearray(P)
    a[100:120] = random.Random(1).randbytes(20)
    b[900:920] = random.Random(2).randbytes(20)
    assert sketch(bytes(a)) != sketch(bytes(b))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(0, 6)), min_size=0, max_size=900),
       st.randoms(use_true_random=False))
def test_group_chunks_cover_each_page_once_with_equal_keys_together(keys, rng) -> None:
    pages = [p * 3 + 1 for p in range(len(keys))]
    rng.shuffle(pages)
    key = {p: keys[(p - 1) // 3] for p in pages}.__getitem__
    chunks = group_chunks(pages, key)
    flat = [p for c in chunks for p in c]
    assert sorted(flat) == sorted(pages)
    assert all(0 < len(c) <= CHUNK_PAGES and c == sorted(c) for c in chunks)
    where: dict[int, set[int]] = {}
    for i, c in enumerate(chunks):
        for p in c:
            if key(p) is not None:
                where.setdefault(key(p), set()).add(i)
    for k, chunk_ids in where.items():
        size = sum(1 for p in pages if key(p) == k)
        assert len(chunk_ids) <= -(-size // CHUNK_PAGES) + 1


def test_the_window_never_outgrows_what_the_target_asks_for() -> None:
    assert GROUP_WINDOW <= MAX_WANTED_PAGES


def shifted_copies_image(copies: int = 3, pages_each: int = 96) -> Image:
    """Text files copied at a few bytes' offset, each copy 200 pages of noise apart."""
    base = text(9, (pages_each + 1) * P)
    parts = []
    for c in range(copies):
        parts.append(base[c * 3 : c * 3 + pages_each * P])
        parts.append(random.Random(c).randbytes(200 * P))
    return Image(b"".join(parts))


def test_a_transfer_grouped_by_similarity_sends_fewer_bytes_and_the_same_image() -> None:
    img = shifted_copies_image()
    ix = build_index(img)
    plain = run_transfer(image=img, index=ix, name="vm", store=PageStore(), level=9)
    grouped = run_transfer(image=img, index=ix, name="vm", store=PageStore(), level=9,
                           similar=page_sketches(img))
    assert plain.verified and grouped.verified
    assert grouped.image is not None
    assert bytes(grouped.image.view(0, img.page_count)) == bytes(img.view(0, img.page_count))
    text_bytes = 3 * 96 * P
    # the text compresses to ~55 % at level 9 (~215 KB a copy): grouped, the two shifted
    # copies cost almost nothing beside the first (measured: 427,504 bytes fewer)
    assert plain.chunk_bytes - grouped.chunk_bytes > 0.3 * text_bytes


def test_a_corrupted_grouped_chunk_is_resent() -> None:
    img = shifted_copies_image(copies=2, pages_each=40)
    ix = build_index(img)
    hits: list[int] = []

    def corrupt(cid: int, attempt: int, frame: bytes | bytearray) -> bytes | bytearray:
        if cid == 1 and attempt == 1:
            hits.append(cid)
            bad = bytearray(frame)
            bad[-1] ^= 0xFF
            return bad
        return frame

    r = run_transfer(image=img, index=ix, name="vm", store=PageStore(), level=6,
                     similar=page_sketches(img), corrupt=corrupt)
    assert hits == [1] and r.verified and r.stats["chunks_rejected"] == 1


def test_live_bytes_measures_snapshots_without_a_guest(tmp_path) -> None:
    """bench.live_bytes measure on small stand-in snapshots: every figure present, the
    grouped round with copies no larger than the round in page order."""
    from bench.live_bytes import measure

    rng = random.Random(5)
    base = bytearray(text(3, 64 * P) + rng.randbytes(736 * P))
    for name in ("t20", "t21", "t22", "t24", "t80", "t82", "t84"):
        fresh = rng.randbytes(160 * P)
        for at in (rng.randrange(0, 200), rng.randrange(400, 600)):  # a buffer and its copy
            base[at * P : (at + 160) * P] = fresh
        (tmp_path / f"{name}.raw").write_bytes(bytes(base))
    out = measure(tmp_path, level=3)
    assert out["snapshots"] == ["t20", "t21", "t22", "t24", "t80", "t82", "t84"]
    assert out["cold"]["similar"]["wire_bytes"] > 0 and out["cold"]["one_ldm_stream_bytes"] > 0
    work = out["return_round1"]["work"]
    assert work["in_place"]["wire_bytes"] == work["copied_base"]["wire_bytes"] > 0
    for r in out["rounds"].values():
        assert r["changed_pages"] >= 320 and r["equal_to_another_page"] >= 160
        # each distinct page once (160 random pages), where page order sends some twice
        assert r["grouped_copies_bytes"] < 1.03 * 160 * P < r["page_order_bytes"]


class ChangingPage:
    """A stored image whose page changes between the target's key check and its copy (as
    a running VM's RAM does; a fingerprint collision would look the same)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.page_count = image.page_count
        self.nbytes = image.nbytes
        self.looks = 0

    def view(self, page: int, count: int = 1) -> memoryview:
        self.looks += 1
        return self.image.view(page if self.looks % 2 else (page + 1) % self.page_count, count)


class LyingStore(PageStore):
    """A store whose dedup answers are wrong by the time they are copied."""

    def lookup(self, key: bytes) -> tuple[PageSource, int] | None:
        hit = super().lookup(key)
        return None if hit is None else (ChangingPage(Image(hit[0].view(0, hit[0].page_count))),
                                         hit[1])


def test_a_grouped_transfer_still_refetches_after_a_wrong_dedup_hit() -> None:
    """The fallback's wants come after the first flush: a source that gathers wants by
    similarity must plan them at the fallback's own flush, or the transfer would hang."""
    other = Image(text(4, 30 * P))
    store = LyingStore()
    store.add("other", other, build_index(other))
    data = bytes(other.view(0, 30)) + text(5, P)
    img = Image(data)
    r = run_transfer(image=img, index=build_index(img), name="vm", store=store, level=6,
                     similar=page_sketches(img))
    assert r.verified and r.image is not None
    assert bytes(r.image.view(0, img.page_count)) == data
    assert r.stats["fallback_blocks"] == 1


def test_sketches_computed_ahead_are_the_sketches_and_close_stops_the_worker() -> None:
    """SketchAhead (issue 17, task livetbf): the pages the target wants are sketched on a
    worker while the diff runs; the keys are page_sketches', whoever computed them."""
    import threading

    from mesh.hde.similar import SketchAhead

    n = 96
    img = Image(text(5, n * P), "s")
    plain = page_sketches(img)
    ahead = SketchAhead(img)
    worker = threading.Thread(target=ahead.run)
    worker.start()
    ahead.want((0, LEAD_PAGES))  # the lead: planned (and sketched) on the spot
    ahead.want((0, 32, 40, 16))
    ahead.want(())
    ahead.close()
    worker.join(5)
    assert not worker.is_alive()
    assert ahead.ahead <= 48
    assert [ahead(p) for p in range(n)] == [plain(p) for p in range(n)]
    assert ahead.ahead + ahead.on_the_spot == n
    # a closed one computes nothing more ahead: a new worker returns at once
    again = threading.Thread(target=ahead.run)
    ahead.want((0, n))
    again.start()
    again.join(5)
    assert not again.is_alive() and ahead.ahead + ahead.on_the_spot == n



def test_the_first_wanted_pages_are_planned_before_the_window_fills() -> None:
    """A grouped source plans its first LEAD_PAGES wanted pages as each want comes (the
    link starts at the diff's first want), the rest once the target flushes; every page
    wanted is planned once, and pages with one key share a chunk within each part."""
    from mesh.core import Received
    from mesh.hde.codec import ChunkPlan
    from mesh.hde.events import EncodeChunk
    from mesh.hde.messages import HdeWant
    from mesh.hde.source import HdeSource

    n = LEAD_PAGES + 2048
    key = {p: p % 7 for p in range(n)}.__getitem__
    src = HdeSource(1, "t", "vm", build_index(Image(bytes(n * P))), similar=key)
    src.start()

    def want(ranges: tuple[int, ...], flush: bool = False) -> list[ChunkPlan]:
        out = src.handle(0.0, Received("t", HdeWant(transfer=1, ranges=ranges, flush=flush),
                                       b""))
        assert all(isinstance(a, EncodeChunk) for a in out)
        return [a.plan for a in out if isinstance(a, EncodeChunk)]

    def pages(plans: list[ChunkPlan]) -> list[int]:
        return sorted(p for plan in plans for p in plan.pages)

    def chunks_per_key(plans: list[ChunkPlan]) -> int:
        return max(len({i for i, plan in enumerate(plans) if k in map(key, plan.pages)})
                   for k in range(7))

    first = want((0, 300))
    assert pages(first) == list(range(300))
    assert chunks_per_key(first) <= 2  # grouped by key within the want: 300 pages, 2 chunks
    # the lead's last pages are planned at once, the rest waits for the window
    second = want((300, LEAD_PAGES + 1000))
    assert pages(second) == list(range(300, LEAD_PAGES))
    rest = want((), flush=True)
    assert pages(rest) == list(range(LEAD_PAGES, LEAD_PAGES + 1300))
    assert chunks_per_key(rest) <= 2  # 1,300 pages of 7 keys: each key's 186 in one or two
    assert [plan.chunk_id for plan in first + second + rest] == list(
        range(len(first) + len(second) + len(rest)))


def test_sketch_ahead_leaves_the_lead_to_the_plan() -> None:
    """The first LEAD_PAGES wanted pages are planned (and sketched) as their want comes:
    SketchAhead's worker is handed only the pages after them."""
    from mesh.hde.similar import SketchAhead

    sk = SketchAhead(Image(bytes(P)))
    sk.want((10, LEAD_PAGES - 100))
    sk.want((LEAD_PAGES, 50, LEAD_PAGES + 200, 300))
    sk.want((9000, 7))
    assert sk._todo.get_nowait() == (LEAD_PAGES + 250, 250)
    assert sk._todo.get_nowait() == (9000, 7)
    assert sk._todo.empty()
