"""The node's data plane, version 3: HDE over AMST (DESIGN.md, "HDE", "AMST").

A pre-copy round of a v3 migration is one HDE transfer per VM image, all of them
in one AMST transfer:

- the *diff* (HDE's tree walk: offers, node/group/fingerprint requests, wants,
  resend requests, the verdict) goes over the control link wrapped in
  :class:`V3Hde` (a few KiB per round);
- the *chunks* (dedup, XOR delta, zstd; :func:`mesh.hde.codec.encode_chunk`) go
  over N AMST streams to the target's ``data`` endpoint, each its own secure
  channel. Chunks are encoded in AMST's preparer worker threads
  (:class:`ChunkFeed`).

The round itself — its start (:class:`~federation.migration.round_messages.V3Round`), the
target's answer (:class:`~federation.migration.round_messages.V3Status`), the resumes of
a cut transfer — is controlled by the rounds core (:mod:`federation.migration.rounds`);
the wire messages are in :mod:`federation.migration.round_messages`.

The source sends from a *shadow* copy of the images, refreshed at the start of
each round with the pages dirtied since the last one, so the pages HDE indexed
are the pages it encodes while the VM keeps writing. The target writes into the
incoming images; its page store holds the other VMs' images on that node and the
incoming copy as of the last verified round, so round 1 is a diff against an
earlier copy of this VM and any other VM. Round k needs no diff: the source knows
what the target verified in round k-1, so it pushes the changed pages (XORed against
the target's old page, or as copies of pages the target holds) without asking
(:mod:`federation.dataplane.v3_push`). Each image's root is recomputed and checked
by the target before the round is reported.

This module holds the pieces both sides of the data plane share.
"""

from __future__ import annotations

import math
import os
import queue
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import trio

from mesh import wire
from mesh.amst.receiver import DIGEST_BYTES, Chunk, ChunkSet
from mesh.hde.codec import MAGIC
from mesh.hde.events import EncodeChunk
from mesh.hde.image import PAGE_SIZE, Overlay
from mesh.hde.level import MODE_LEVELS, LevelGovernor, choose_level, measure_ladder
from mesh.hde.messages import CHUNK_PAGES

__all__ = ["ChunkFeed", "Overlay", "peek_chunk", "choose_chunk_level", "AMST_CHUNK_OVERHEAD",
           "PREPARERS", "SAMPLE_PAGES", "connect_data", "CONNECT_TIMEOUT_S"]

#: Chunks encoded at once: one per core of the reference machine (2 cores); zstd
#: releases the GIL, so both work (DESIGN.md, "Transport").
PREPARERS = 2
#: AMST bytes a chunk costs beyond its payload: the amst.chunk CBOR envelope with its
#: SHA-256 digest, the secretstream tag (17 bytes) and the 4-byte frame length.
AMST_CHUNK_OVERHEAD = len(wire.encode(Chunk(2**32, b"\0" * DIGEST_BYTES, b""))) + 17 + 4
#: Pages compressed to choose the zstd level (1 MiB): level 19 of DESIGN's internet range
#: takes ~0.2 s on it at ~5 MB/s (mesh.hde.level's measurements), an acceptable one-off
#: cost per migration, while a smaller sample makes the ratios noisy.
SAMPLE_PAGES = 256
#: A chunk frame is at most CHUNK_PAGES pages stored, its header (23 bytes), up to
#: CHUNK_PAGES ranges of two 10-byte varints, the XOR bitmap, the length and the digest.
_MAX_FRAME = CHUNK_PAGES * PAGE_SIZE + 23 + CHUNK_PAGES * 20 + CHUNK_PAGES // 8 + 4 + 16
_PEEK = struct.Struct("<4sQQ")
#: How often a waiting preparer checks whether its round was cancelled: a cancelled round
#: (an abort) then ends within 0.2 s, the same period as AMST's own stream poll
#: (mesh.runtime.amst_stream.POLL_MS).
_POLL_S = 0.2
#: Ids kept before a full sweep for acknowledged ones: 64 frames of ~1 MiB, the order of
#: AMST's window (mesh.amst.sender.DEFAULT_WINDOW_BYTES, 64 MiB).
_SWEEP_MIN = 64
#: What a preparer sends when the feed closed under it: shorter than any chunk header.
_END = b"\0"


#: A data connection not set up within 3 s is a path that is down for now: Linux sends the
#: SYN again after the initial RTO of 1 s (RFC 6298 §2.1) and 2 s later, so two SYNs went
#: unanswered; the AMST sender then backs off and tries again (mesh.amst.sender), rather
#: than waiting out the kernel's ~2 min of SYN retries.
CONNECT_TIMEOUT_S = 3.0


async def connect_data(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to a data endpoint; ``trio.TooSlowError`` after CONNECT_TIMEOUT_S."""
    with trio.fail_after(CONNECT_TIMEOUT_S):
        return await trio.open_tcp_stream(host, port)


def peek_chunk(payload: bytes | memoryview) -> tuple[int, int] | None:
    """(HDE transfer, chunk id) of a chunk frame; None for a feed's end marker or junk
    (the HDE target checks the whole frame itself)."""
    if len(payload) < _PEEK.size:
        return None
    magic, xfer, cid = _PEEK.unpack_from(payload)
    if magic != MAGIC:
        return None
    return xfer, cid


#: ``encode(image, plan, level)``: a chunk's frame at zstd ``level``
Encoder = Callable[[int, EncodeChunk, int], bytes | bytearray]


class ChunkFeed:
    """Adapts HDE's interactive chunk plans to AMST's pull model (:class:`mesh.runtime.amst_transfer
    .ChunkSource`): ``next_chunk`` hands AMST a placeholder while the feed is open; AMST's
    ``prepare`` (a worker thread) then waits for the next planned chunk and encodes it
    there. When the feed is closed (every image verified), a waiting preparer returns an
    one-byte end marker, which the target ignores; at most ``preparers`` of them are sent.

    A chunk id is bound to its frame only when a preparer encodes it, so the feed keeps
    every frame until the receiver acknowledges it (``bind``: the running sender's
    acknowledged set): when the transfer is cut and resumed by a new sender,
    :meth:`resume` offers the ids not known acknowledged again, each with the frame it had
    (or, never prepared, with the next plan), and the receiver's first Ack skips the ones
    it holds. What is kept is what AMST holds in flight anyway: at most its window."""

    def __init__(self, encode: Encoder, level: int = 1, governor: LevelGovernor | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._encode = encode
        #: the level every chunk is encoded at, unless ``governor`` moves it chunk by chunk
        self.level = level
        self._governor = governor
        self._clock = clock
        #: bytes of the prepared frames not yet known acknowledged (what AMST holds queued
        #: and in flight), and of the frames known acknowledged so far
        self._held_bytes = 0
        self.acked_bytes = 0
        #: the backlog as the event loop last saw it (read by the preparers' governor)
        self._backlog = 0
        #: the running sender's written bytes, and the frame bytes prepared before it
        self._written: Callable[[], int] | None = None
        self._written_base = 0
        self._held_back: Callable[[], bool] | None = None
        #: seconds the preparers waited for a plan (the diff had not asked for more), and
        #: spent encoding (each thread's wall time; two preparers overlap)
        self.starved_s = 0.0
        self.encode_s = 0.0
        #: the time of the first frame prepared, of the last, and the levels used (counts)
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        self.levels: dict[int, int] = {}
        self._queue: queue.Queue[tuple[int, EncodeChunk] | None] = queue.Queue()
        self._closed = threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self._placeholder = memoryview(bytes(_MAX_FRAME))
        self._pending = 0  # planned chunks not yet taken by a preparer
        self._issued: dict[int, None] = {}  # ids handed out, not known acknowledged
        self._held: dict[int, bytes] = {}  # their frames, once prepared
        self._replay: deque[int] = deque()
        self._acked = ChunkSet()
        self._sweep_at = _SWEEP_MIN
        self.frames = 0
        self.frame_bytes = 0
        #: pages in the chunks encoded so far (the round's progress in pages)
        self.pages = 0
        self.markers = 0
        #: frames offered again by a resumed transfer (and their bytes)
        self.replayed = 0
        self.replayed_bytes = 0

    def put(self, image: int, action: EncodeChunk) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put((image, action))

    def close(self) -> None:
        self._closed.set()
        self._queue.put(None)  # wakes one waiting preparer; it passes the word on

    def bind(self, acked: ChunkSet, written: Callable[[], int] | None = None,
             held_back: Callable[[], bool] | None = None) -> None:
        """The chunk ids the running sender knows acknowledged (its live set); how many
        payload bytes it wrote to its streams so far (its ``written_bytes``): the
        governor's measure of the link (None: acknowledged bytes stand in); and whether
        its window is nearly full of chunks not acknowledged (the receiver or the link
        holds the transfer back, not the encoders)."""
        with self._lock:
            self._acked = acked
            self._forget_acked()
            self._held_back = held_back
            if written is not None:
                # a resumed transfer's sender counts from 0: only its own frames count
                self._written = written
                self._written_base = self.frame_bytes + self.replayed_bytes

    def resume(self) -> None:
        """A new sender takes over a cut transfer: offer again every id handed out and not
        known acknowledged, before any new one. Those with a frame go first: an id never
        prepared waits in its preparer for the next plan, and the plans may wait for the
        held frames to arrive (the target asks for more as chunks land)."""
        with self._lock:
            self._forget_acked()
            ids = sorted(self._issued)
            self._replay = deque([c for c in ids if c in self._held]
                                 + [c for c in ids if c not in self._held])

    @property
    def held(self) -> int:
        """Frames kept for a resume (prepared, not known acknowledged)."""
        with self._lock:
            return len(self._held)

    def _forget_acked(self, sweep: bool = True) -> None:
        """Drop what is acknowledged: from the oldest id while they are (acks come mostly in
        order), and everywhere on a sweep, which runs when asked and whenever the ids kept
        doubled since the last one (so each next_chunk costs O(1) amortized)."""
        issued = self._issued
        while issued:
            first = next(iter(issued))
            if first not in self._acked:
                break
            del issued[first]
            self._acked_frame(first)
        if sweep or len(issued) >= self._sweep_at:
            for cid in [c for c in issued if c in self._acked]:
                del issued[cid]
                self._acked_frame(cid)
            self._sweep_at = max(_SWEEP_MIN, 2 * len(issued))
        self._backlog = self._held_bytes

    def _acked_frame(self, cid: int) -> None:
        frame = self._held.pop(cid, None)
        if frame is not None:
            self._held_bytes -= len(frame)
            self.acked_bytes += len(frame)

    def next_chunk(self, size_hint: int) -> tuple[int, memoryview] | None:
        with self._lock:
            # a full sweep while a governor reads the backlog: streams acknowledge out of
            # order, and the sweep is over at most AMST's window of ids
            self._forget_acked(sweep=self._governor is not None)
            if self._replay:
                return self._replay.popleft(), self._placeholder
            if self._closed.is_set() and self._pending == 0:
                return None
            cid, self._next = self._next, self._next + 1
            self._issued[cid] = None
        return cid, self._placeholder

    def prepare(self, chunk: int, raw: bytes | memoryview) -> bytes:
        """Worker thread: the frame ``chunk`` had (a resumed transfer), else the next planned
        chunk, encoded; an end marker once closed."""
        with self._lock:
            held = self._held.get(chunk)
            if held is not None:
                self.replayed += 1
                self.replayed_bytes += len(held)
                return held
        t0 = self._clock()
        held_back = self._held_back is not None and self._held_back()
        starved = False
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S) if starved else self._queue.get_nowait()
            except queue.Empty:
                if starved:
                    trio.from_thread.check_cancelled()  # the round was cancelled: stop waiting
                starved = True
                continue
            if item is None:
                self._queue.put(None)
                with self._lock:
                    self.markers += 1
                    self._keep(chunk, _END)
                return _END
            t1 = self._clock()
            with self._lock:
                self._pending -= 1
                if starved:
                    self.starved_s += t1 - t0
                level = self.level
                if self._governor is not None:
                    level = self.level = self._governor.next_level(
                        t1, *self._progress(), starved or held_back)
            frame = bytes(self._encode(*item, level))
            t2 = self._clock()
            with self._lock:
                self.frames += 1
                self.frame_bytes += len(frame)
                self.pages += item[1].plan.count
                self.encode_s += t2 - t1
                self.levels[level] = self.levels.get(level, 0) + 1
                if self._governor is not None:
                    self._governor.encoded(level, t2 - t1, item[1].plan.count * PAGE_SIZE)
                if self.first_frame_at is None:
                    self.first_frame_at = t2
                self.last_frame_at = t2
                self._keep(chunk, frame)
            return frame

    def level_steps(self, since: float) -> list[tuple[float, int]]:
        """The governor's steps as (seconds after ``since`` on the feed's clock, the new
        level): where a round's level moved, for its figures."""
        with self._lock:
            steps = list(self._governor.steps) if self._governor is not None else []
        return [(round(t - since, 3), level) for t, level in steps]

    def _progress(self) -> tuple[int, int]:
        """(backlog, drained) for the governor, under the lock: with the sender's written
        bytes, the frames prepared and not yet written to a stream, and the bytes
        written (a stream's socket buffer keeps the link busy; what waits for a stream
        is the encoders' lead); without, the frames not acknowledged, and the bytes
        acknowledged."""
        if self._written is None:
            return self._backlog, self.acked_bytes
        written = self._written()
        prepared = self.frame_bytes + self.replayed_bytes - self._written_base
        return max(0, prepared - written), written

    def _keep(self, chunk: int, frame: bytes) -> None:
        if chunk in self._issued:
            old = self._held.get(chunk)
            self._held_bytes += len(frame) - (0 if old is None else len(old))
            self._held[chunk] = frame
            self._backlog = self._held_bytes


def choose_chunk_level(sample: Sequence[bytes], mode: str | None, bw_mbps: float | None,
                       default_mbps: float) -> tuple[str, int]:
    """(mode, zstd level) for a migration's chunks: the level from encode rates measured
    here on ``sample`` (page data that will be sent) against the link rate measured for
    the peer (``bw_mbps``; ``default_mbps`` while it has none), over the whole ladder
    :data:`mesh.hde.level.LEVELS` whatever the mode (issue 17 item 6: never a level slower
    than sending uncompressed on that link). The mode is the link's label, for AMST's
    stream bounds; an unclassified link is taken as hybrid — DESIGN's "anything
    between"."""
    used = mode if mode in MODE_LEVELS else "hybrid"
    mbps = bw_mbps if bw_mbps is not None and bw_mbps > 0 else default_mbps
    link = mbps * 1e6 / 8
    cores = max(1, min(os.cpu_count() or 1, PREPARERS, len(sample)))
    if not sample or math.fsum(len(s) for s in sample) == 0:
        return used, 0
    # timed on as many threads as the encoders run on: what they will get of the host
    with ThreadPoolExecutor(cores, thread_name_prefix="level") as ex:
        samples = measure_ladder(sample, link, cores, time.perf_counter, executor=ex)
    return used, choose_level(samples, link, cores)
