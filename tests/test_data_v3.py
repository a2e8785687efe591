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
from mesh.hde.codec import ChunkPlan, decode_chunk, encode_chunk
from mesh.hde.events import EncodeChunk
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.level import MODE_LEVELS


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
    feed = ChunkFeed(lambda i, e: encode_chunk(e.transfer, e.plan, img, None, 1))
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
    feed = ChunkFeed(lambda i, e: b"never")
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


def test_level_from_mode_and_speed() -> None:
    sample = [bytes(_image(64, 3).view(0, 64))]
    mode, level = choose_chunk_level(sample, None, None, 1000.0)
    assert mode == "hybrid" and level in MODE_LEVELS["hybrid"]
    mode, level = choose_chunk_level(sample, "internet", 10.0, 1000.0)
    assert mode == "internet" and level in MODE_LEVELS["internet"] and level >= 1
    assert choose_chunk_level([], "datacenter", None, 1000.0) == ("datacenter", 0)
