"""Unit tests of the v3 data plane's pieces (federation.dataplane.v3_protocol): the chunk
feed that adapts HDE's plans to AMST's pull model, the XOR reference overlay, the frame
peek, the level; and the v3 round messages (federation.migration.round_messages)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import trio
from hypothesis import given
from hypothesis import strategies as st

from federation.dataplane.v3_protocol import ChunkFeed, Overlay, choose_chunk_level, peek_chunk
from federation.migration.round_messages import V3Hde, V3Round, V3Status, transfer_id
from mesh import wire
from mesh.amst.receiver import ChunkSet
from mesh.hde.codec import ChunkPlan, decode_chunk, encode_chunk
from mesh.hde.events import EncodeChunk
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.level import LEVELS, MODE_LEVELS, LevelGovernor


def _image(pages: int, seed: int) -> ImageWriter:
    """Pages of real text (this module's own source), shifted per page."""
    text = open(__file__, "rb").read()
    buf = bytearray()
    for p in range(pages):
        start = (p * 97 + seed) % len(text)
        page = (text[start:] + text)[:PAGE_SIZE]
        buf += page
    return ImageWriter(buf, "img")


def test_overlay_serves_old_pages_and_the_image_elsewhere() -> None:
    img = _image(8, 1)
    old = {3: b"\1" * PAGE_SIZE}
    ov = Overlay(img, old)
    assert ov.page_count == 8
    assert bytes(ov.view(3)) == old[3]
    assert bytes(ov.view(2)) == bytes(img.view(2))
    assert bytes(ov.view(2, 3)) == bytes(img.view(2)) + old[3] + bytes(img.view(4))
    assert bytes(ov.view(5, 2)) == bytes(img.view(5, 2))


def test_feed_encodes_in_order_then_ends() -> None:
    img = _image(16, 2)
    feed = ChunkFeed(lambda i, e, level: encode_chunk(e.transfer, e.plan, img, None, level))
    plans = [EncodeChunk(1, ChunkPlan(c, (c * 4, 4)), None) for c in range(3)]

    async def main() -> list[bytes]:
        out = []
        for p in plans:
            feed.put(0, p)
        for _ in range(3):
            cid, raw = feed.next_chunk(1 << 20)
            out.append(await trio.to_thread.run_sync(feed.prepare, cid, raw))
        feed.close()
        cid, raw = feed.next_chunk(1 << 20) or (None, None)
        assert cid is None  # closed with nothing pending: the source is exhausted
        return out

    frames = trio.run(main)
    for c, frame in enumerate(frames):
        assert peek_chunk(frame) == (1, c)
        chunk = decode_chunk(frame, 1, 16)
        assert chunk.data == bytes(img.view(c * 4, 4))
    assert feed.frames == 3 and feed.frame_bytes == sum(len(f) for f in frames)


class _WatchedQueue(queue.Queue):  # type: ignore[type-arg]
    """The feed's queue of plans, telling when a preparer starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.waited.set()
        return super().get(block, timeout)


def test_feed_ends_a_waiting_preparer_when_closed() -> None:
    feed = ChunkFeed(lambda i, e, level: b"never")
    plans = feed._queue = _WatchedQueue()  # watched, so the test closes a waiting preparer

    async def main() -> bytes:
        cid, raw = feed.next_chunk(1 << 20)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def prep() -> None:
                got.append(await trio.to_thread.run_sync(feed.prepare, cid, raw))

            nursery.start_soon(prep)
            with trio.fail_after(10):
                await trio.to_thread.run_sync(plans.waited.wait, abandon_on_cancel=True)
            feed.close()
        return got[0]

    marker = trio.run(main)
    assert peek_chunk(marker) is None and feed.markers == 1 and feed.frames == 0


@given(st.binary(max_size=64))
def test_peek_never_raises(data: bytes) -> None:
    got = peek_chunk(data)
    assert got is None or (len(data) >= 20 and data.startswith(b"HDE"))


def test_messages_round_trip_and_ids_differ_per_round() -> None:
    for msg in (V3Round("m", 2, transfer_id("m", 2), ("disk-0", "memory")),
                V3Status("m", 2, "why"), V3Hde("m", 2, 1, b"\x80")):
        assert wire.decode(wire.encode(msg)) == msg
    assert transfer_id("m", 1) != transfer_id("m", 2) != transfer_id("n", 2)
    assert len(transfer_id("m", 1)) == 16


def test_level_from_measured_speed_not_from_the_mode_label() -> None:
    sample = [bytes(_image(64, 3).view(0, 64))]
    mode, level = choose_chunk_level(sample, None, None, 1000.0)
    assert mode == "hybrid" and level in LEVELS
    # a 1 Mbit/s link labelled "datacenter": the label bounds nothing, the measured rate
    # lets the CPU compress harder than any datacenter level
    mode, level = choose_chunk_level(sample, "datacenter", 1.0, 1000.0)
    assert mode == "datacenter" and level in LEVELS and level > max(MODE_LEVELS["datacenter"])
    assert choose_chunk_level([], "datacenter", None, 1000.0) == ("datacenter", 0)


def test_feed_moves_the_level_with_its_governor_while_the_link_falls_behind() -> None:
    """The link drains one frame of four: the backlog of frames not acknowledged grows,
    so the governor raises the level chunk by chunk; the feed counts what it did."""
    img = _image(64, 5)
    now = [0.0]
    used: list[int] = []

    def encode(i: int, e: EncodeChunk, level: int) -> bytes | bytearray:
        used.append(level)
        return encode_chunk(e.transfer, e.plan, img, None, level)

    feed = ChunkFeed(encode, 1, LevelGovernor(1), clock=lambda: now[0])
    acked = ChunkSet()
    feed.bind(acked)
    for c in range(16):
        feed.put(0, EncodeChunk(1, ChunkPlan(c, (c * 4, 4)), None))

    async def main() -> None:
        for c in range(16):
            cid, raw = feed.next_chunk(1 << 20) or (-1, memoryview(b""))
            assert cid == c
            await trio.to_thread.run_sync(feed.prepare, cid, raw)
            now[0] += 0.1
            if c % 4 == 3:
                acked.add(c // 4)

    trio.run(main)
    assert used[0] == 1 and max(used) > 1 and used == sorted(used)
    assert feed.levels == {lv: used.count(lv) for lv in set(used)}
    assert feed.frames == 16 and 0 < feed.acked_bytes < feed.frame_bytes
    assert feed.encode_s >= 0 and feed.starved_s == 0.0
    # each step up, timed on the feed's clock from a given start, for the round figures
    steps = feed.level_steps(0.5)
    assert steps and [lv for _, lv in steps] == sorted(set(used) - {1})
    assert all(-0.5 <= t <= 1.6 for t, _ in steps)


def _drive_feed(start: int, link_takes: float, held_back: bool = False) -> list[int]:
    """A feed whose sender's sockets take ``link_takes`` of each frame's bytes as it is
    prepared (1.0: everything at once, the encoders are the bottleneck); the levels used."""
    img = _image(64, 7)
    now = [0.0]
    used: list[int] = []
    written = [0.0]

    def encode(i: int, e: EncodeChunk, level: int) -> bytes | bytearray:
        used.append(level)
        return encode_chunk(e.transfer, e.plan, img, None, level)

    feed = ChunkFeed(encode, start, LevelGovernor(start), clock=lambda: now[0])
    feed.bind(ChunkSet(), lambda: int(written[0]), lambda: held_back)
    for c in range(24):
        feed.put(0, EncodeChunk(1, ChunkPlan(c, (c * 2, 2)), None))

    async def main() -> None:
        for _ in range(24):
            cid, raw = feed.next_chunk(1 << 20) or (-1, memoryview(b""))
            frame = await trio.to_thread.run_sync(feed.prepare, cid, raw)
            written[0] += link_takes * len(frame)
            now[0] += 0.1

    trio.run(main)
    return used


def _ranks(levels: list[int]) -> list[int]:
    """Each level's place on the governor's ladder (cheapest first: store, -5, -1, 1...)."""
    return [LevelGovernor(0).ladder.index(lv) for lv in levels]


def test_feed_steps_down_when_the_streams_take_every_frame_at_once() -> None:
    used = _drive_feed(9, link_takes=1.0)
    ranks = _ranks(used)
    assert used[0] == 9 and used[-1] == 0 and ranks == sorted(ranks, reverse=True)


def test_feed_steps_up_while_frames_wait_for_the_streams() -> None:
    used = _drive_feed(1, link_takes=0.25)
    ranks = _ranks(used)
    assert used[0] == 1 and used[-1] > 1 and ranks == sorted(ranks)


def test_feed_holds_the_level_when_the_window_holds_the_transfer_back() -> None:
    assert set(_drive_feed(9, link_takes=1.0, held_back=True)) == {9}
