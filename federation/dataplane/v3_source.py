"""The source side of the v3 data plane (see :mod:`federation.dataplane.v3_protocol`): a
round's images as HDE transfers, their chunks over AMST to the target's data endpoint.

This is the trio driver of a round the rounds core controls
(:class:`federation.migration.round_source.V3Sending`): on
:class:`~federation.migration.round_events.V3Prepare` it refreshes the migration's
shadow images and indexes them (worker threads) and reports
:class:`~federation.migration.round_events.V3Prepared`; the core announces the round
and, once the target is ready, says :class:`~federation.migration.round_events.V3Transfer`:
the diff runs over the control link (:class:`V3Hde`) and the chunks over AMST, and
the driver reports what moved about once a second. When every AMST stream failed a
few times in a row (:data:`mesh.amst.sender.MAX_FAILURES`) it reports the cut and waits
for the core's :class:`~federation.migration.round_events.V3Resume` (or a cancel): the
target's receiver outlives the streams and answers the new ones with what it already
holds, and the chunk feed offers again only the frames not acknowledged
(:class:`federation.dataplane.v3_protocol.ChunkFeed`), so nothing the target stored
crosses twice. A round that cannot go on reports
:class:`~federation.migration.round_events.V3Failed`; the core fails it, and the
session aborts in the ledger with the VM still at its source."""

from __future__ import annotations

import errno
import functools
import re
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import trio

from federation.dataplane.v3_protocol import AMST_CHUNK_OVERHEAD, PREPARERS, ChunkFeed, Overlay
from federation.dataplane.v3_push import (
    HeldPages,
    PushSource,
    StreamSource,
    V3Held,
    differing_pages,
    is_push,
    nonzero_pages,
)
from federation.dataplane.v3_shadow import COPY_PAGES, SourceState, read_pages, sample_pages
from federation.migration.round_events import (
    V3Cut,
    V3Failed,
    V3Moved,
    V3Prepare,
    V3Prepared,
    V3Preparing,
    V3Verified,
)
from federation.migration.round_messages import V3Hde, transfer_id
from federation.vms.backend import VmBackend, VmError
from federation.vms.dirty_scan import GROUP_PAGES, SentDigests, changed_pages, group_digests
from federation.vms.per_vm import dirty_by_content
from federation.vms.sealing import SealKey
from mesh import versions, wire
from mesh.amst.receiver import AmstError
from mesh.amst.sender import CHUNK_MAX, AmstSender
from mesh.channel import SecureChannel
from mesh.core import Notify, Received, Send
from mesh.hde.codec import ChunkError, encode_chunk
from mesh.hde.events import EncodeChunk
from mesh.hde.image import Image, ImageError
from mesh.hde.index import IndexBuilder, PageIndex, build_index, zero_index
from mesh.hde.level import LevelGovernor
from mesh.hde.messages import HdeWant
from mesh.hde.similar import LEAD_PAGES, SketchAhead, group_chunks, similar_at
from mesh.hde.source import HdeSource
from mesh.runtime.amst_transfer import TransferCut, send_transfer

__all__ = ["V3RoundSender", "V3Sender", "RoundFailed", "round_error", "PREPARERS"]

#: What moved is reported to the rounds core this often while a transfer runs: the
#: period at which a session hears of a round's progress
#: (federation.migration.round_source.PROGRESS_EVERY), far inside the round's quiet bound.
_REPORT_S = 0.5

Report = Callable[[object], None]
Connect = Callable[[], Awaitable[trio.abc.Stream]]


class RoundFailed(Exception):
    """A round cannot go on (the target refused it, a bad diff message, a root differs)."""


_ROUND_ERRORS = (RoundFailed, VmError, ImageError, ChunkError, AmstError, OSError)


def round_error(exc: BaseException) -> BaseException | None:
    """The failure of a round inside ``exc``, or None if ``exc`` is something else.

    A round runs its streams in a nursery, which raises its error wrapped in an
    ExceptionGroup; a round that failed that way is still just a failed round (the
    session aborts the migration), never a reason to take the node down.
    """
    if isinstance(exc, _ROUND_ERRORS):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        failed, other = exc.split(_ROUND_ERRORS)
        if failed is not None and other is None:
            leaf: BaseException = failed
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


#: Pages of round 1 streamed to a cold target in the order read when its level groups
#: pages by similarity (mesh.hde.similar.SIMILAR_FROM_LEVEL); the others wait for the
#: copy's end and go grouped over the whole image (copies of a page lie far apart: 11 %
#: fewer bytes at levels 6-9 on the bench guest, 0.5 % within 16 MiB windows). The lead
#: keeps the link busy through the copy and the grouping: 32 MiB of pages, ~15-19 MB at
#: levels 6-12, ~1.2-1.5 s of a 100 Mbit/s link against a quiet copy of 1.14 s and a
#: sketch of the rest of ~0.3 s; ~23 % of the bench guest's non-zero pages, so about a
#: quarter of the grouping's gain is given up for a link busy from the target's word.
STREAM_LEAD_PAGES = 2 * LEAD_PAGES


#: Seconds into round 1's copy at which the guest's dirty rate is sampled the first time
#: (:class:`_EarlySample`): long against the two scans' own time, short against a copy of
#: all RAM (1.3-1.8 s for 256 MiB on a quiet 2-core machine beside a TCG guest).
EARLY_SAMPLE_S = 0.3


class _EarlySample:
    """The guest's dirty rate early in round 1 (worker thread): the XXH3 digest of every
    16 KiB group of the live images at the copy's start, compared with a second scan once
    the copy ran :data:`EARLY_SAMPLE_S`. A group that differs counts as its pages written
    (a bound: a guest's fresh data fills groups, scattered words count up to 4x), over
    the time between the two scans' midpoints. Two scans at memory speed, so the round
    policy can throttle the guest for the rest of round 1 instead of after its copy."""

    def __init__(self, live: dict[str, Image]) -> None:
        started = time.monotonic()
        self._groups = {n: group_digests(img) for n, img in live.items()}
        self._at = (started + time.monotonic()) / 2

    def sample(self, live: dict[str, Image]) -> tuple[int, float]:
        """Pages written since the first scan, and the seconds they had."""
        started = time.monotonic()
        dirtied = 0
        for name, img in live.items():
            old = self._groups.get(name)
            if old is None:
                continue
            for g in changed_pages(old, group_digests(img)):
                dirtied += min(GROUP_PAGES, img.page_count - g * GROUP_PAGES)
        return dirtied, max(1e-3, (started + time.monotonic()) / 2 - self._at)


Source = HdeSource | PushSource | StreamSource


class _Stream:
    """Round 1 streamed to a cold target (:class:`~federation.dataplane.v3_push.StreamSource`):
    the pages the copy read, planned as chunks from the first piece on once the target
    said each incoming image holds zero pages (:class:`~federation.dataplane.v3_push.V3Held`,
    before its word to go), the offers with the roots once the copy and its index ended.

    The copy (a worker thread) hands each piece it read to :meth:`copied`; the round's
    task decides at the target's word (:meth:`begin`), or, if the copy ended first, at its
    end: a target that held anything else, or said nothing (an older build), gets the
    round diffed as before (:meth:`decline`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: the images in the round's order with their page counts, the round's dirty mark
        #: and page count (known when the round is announced, before the copy)
        self.layout: list[tuple[str, int]] = []
        self.mark = 0
        self.covered = 0
        #: image -> (page count, root) its target copy holds, as the target said
        self.held: dict[int, tuple[int, bytes]] = {}
        self.declined = False
        #: the pages read so far, while undecided: (image, nonzero pages) per piece
        self._pending: list[tuple[str, list[int]]] = []
        self.sources: dict[str, StreamSource] | None = None
        self.feed: ChunkFeed | None = None
        #: pages planned in the order read (at most ``lead`` of them; None: every page),
        #: and per image the pages read beyond the lead, planned by plan_rest
        self.lead: int | None = None
        self.in_order = 0
        self._rest: dict[str, list[int]] = {}
        #: set once the level is chosen (before the copy), and once the images are indexed
        self.leveled = trio.Event()
        self.indexed = trio.Event()
        self.indexes: dict[str, PageIndex] = {}
        self.scope = trio.CancelScope()

    def cold(self) -> bool:
        """Whether the target said every image of the round holds zero pages only."""
        if self.declined or not self.layout or len(self.held) != len(self.layout):
            return False
        return all(self.held.get(i) == (count, zero_index(count).root)
                   for i, (_, count) in enumerate(self.layout))

    def hear(self, image: int, msg: V3Held) -> None:
        """The target's word on what image ``image`` holds (event loop)."""
        if image in self.held:
            return  # said once: a second word does not change the decision
        self.held[image] = (msg.page_count, msg.root)
        if self.layout and not self.cold() and len(self.held) == len(self.layout):
            self.decline()

    def copied(self, name: str, first: int, data: bytes) -> None:
        """Worker thread: pages ``first``.. of image ``name`` were read as ``data``."""
        if self.declined:
            return
        pages = nonzero_pages(first, data)
        with self._lock:
            if self.sources is not None and self.feed is not None:
                self._plan(name, pages)
            elif not self.declined:
                self._pending.append((name, pages))

    def _plan(self, name: str, pages: list[int]) -> None:
        assert self.sources is not None and self.feed is not None
        if self.lead is not None:
            # beyond the lead, the pages wait for the copy's end to be grouped
            take = max(0, self.lead - self.in_order)
            self._rest.setdefault(name, []).extend(pages[take:])
            pages = pages[:take]
        self.in_order += len(pages)
        image = next(i for i, (n, _) in enumerate(self.layout) if n == name)
        for action in self.sources[name].add(pages):
            self.feed.put(image, action)

    def begin(self, sources: dict[str, StreamSource], feed: ChunkFeed,
              lead: int | None = None) -> None:
        """Stream: what was read so far is planned now, the rest as it is read; with
        ``lead``, only that many pages in the order read, the others grouped once the
        copy ended (:meth:`plan_rest`)."""
        with self._lock:
            self.sources, self.feed, self.lead = sources, feed, lead
            for name, pages in self._pending:
                self._plan(name, pages)
            self._pending = []

    def plan_rest(self, keys: Mapping[str, Callable[[int], Hashable | None]]) -> int:
        """Worker thread, once the copy ended: the pages beyond the lead in chunks of
        pages with equal keys (:func:`mesh.hde.similar.group_chunks`); how many."""
        with self._lock:
            rest, self._rest = self._rest, {}
        assert self.sources is not None and self.feed is not None
        grouped = 0
        for image, (name, _) in enumerate(self.layout):
            pages = rest.get(name, [])
            grouped += len(pages)
            for chunk in group_chunks(pages, keys[name]):
                for action in self.sources[name].add(chunk):
                    self.feed.put(image, action)
        return grouped

    def decline(self) -> None:
        """The round is diffed: nothing more is kept."""
        with self._lock:
            self.declined = True
            self._pending = []
        self.scope.cancel()


def _progress_of(core: AmstSender) -> tuple[Callable[[], int], Callable[[], bool]]:
    """What the preparers' level governor reads of ``core``: the payload bytes it wrote to
    its streams so far, and whether its window is within two chunks of full (the
    receiver or the link holds the transfer back: mesh.hde.level.LevelGovernor)."""
    return (lambda: core.written_bytes,
            lambda: core.room() < 2 * CHUNK_MAX)


class V3RoundSender:
    """One v3 round of one migration (see the module docstring); ``deliver`` is fed the
    target's :class:`V3Hde`, ``go``/``resume`` the rounds core's word."""

    version = 3

    def __init__(
        self,
        action: V3Prepare,
        backend: VmBackend,
        state: SourceState,
        *,
        send: Callable[[str, Any], bool],
        connect: Connect,
        new_channel: Callable[[], SecureChannel],
        choose_level: Callable[[list[bytes]], tuple[str, int]],
        report: Report,
        executor: Executor | None = None,
        fenced_indexes: Callable[[str], dict[str, PageIndex] | None] | None = None,
    ) -> None:
        self.action = action
        self._fenced_indexes = fenced_indexes
        self.target = action.target
        self.backend = backend
        self.state = state
        self._send = send
        self._connect = connect
        self._new_channel = new_channel
        self._choose_level = choose_level
        self._report = report
        self._executor = executor
        self._inbox_send, self._inbox = trio.open_memory_channel[V3Hde](1024)
        self._go = trio.Event()
        self._resume = trio.Event()
        self.scope = trio.CancelScope()
        self.control_bytes = 0
        #: chunks re-sent by AMST over every (re)start of the transfer
        self.resent = 0
        self.streams = 0
        #: bytes of the chunk frames written whole to AMST streams, every copy counted
        self.chunk_bytes = 0
        #: per image the bytes of the pages this round's refresh copied into the shadow
        self._news: dict[str, dict[int, bytes]] = {}
        #: per image the index round 1's copy built from the bytes it copied
        self._built: dict[str, PageIndex] = {}
        #: pages the preparation went over (copied, digested, indexed), reported when due
        self._prepared = 0
        self._next_prepared = time.monotonic() + _REPORT_S
        #: the data channels this round opened to the target (what it offers)
        self._channels: list[SecureChannel] = []
        #: when the target's word to go came (the feed's clock, time.monotonic)
        self._go_at = time.monotonic()
        #: seconds round 1 took to choose the level (before its copy)
        self._level_s = 0.0
        #: per HDE image chunked by similarity, its sketches computed as the wants come
        self._sketches: dict[int, SketchAhead] = {}
        #: when the round was announced, if before its preparation ended (round 1)
        self._announced: float | None = None
        #: round 1 of a migration: streamed if the target turns out cold (_Stream)
        self._stream: _Stream | None = _Stream() if action.since is None else None

    @property
    def migration_id(self) -> str:
        return self.action.migration_id

    @property
    def round(self) -> int:
        return self.action.round

    def deliver(self, msg: V3Hde) -> None:
        if msg.migration_id == self.migration_id and msg.round == self.round:
            if self._stream is not None and not self._go.is_set():
                # before the target's word only its V3Held comes: what it holds (the
                # diff starts with the source's offer, after the word)
                try:
                    inner = wire.decode(msg.body)
                except wire.WireError:
                    inner = None
                if isinstance(inner, V3Held):
                    self._stream.hear(msg.image, inner)
                    return
            try:
                self._inbox_send.send_nowait(msg)
            except trio.WouldBlock:  # a flooding peer: the round fails on its own quiet bound
                pass

    def go(self) -> None:
        """The target is ready: start the transfer."""
        self._go.set()

    def resume(self) -> None:
        """Resume the cut transfer."""
        self._resume.set()

    # ------------------------------------------------------------------ the shadow

    def _refresh(self) -> tuple[int, dict[str, dict[int, bytes]], int]:
        """Worker thread: bring the shadow up to the live images. Returns the logical pages
        the round covers, per image the old bytes of the pages that changed, and the new
        dirty generation."""
        a, b, st = self.action, self.backend, self.state
        rescans = dirty_by_content(b, a.vm)
        # before reading: a later write shows in the next round (a VM tracked by content
        # compares with its shadow instead, after the first round: no scan here)
        mark = a.since if rescans and a.since is not None else b.dirty_mark(a.vm)
        layout = b.info(a.vm).layout
        live = b.open_images(a.vm)
        try:
            if a.since is None or set(st.shadows) != {n for n, _ in layout}:
                st.reset(layout)
                # announced before the copy: all it says is known now (the images, the
                # mark, every page), so the target gets ready while RAM is copied
                # instead of after (its readiness took 0.40 s on the quiet bench guest
                # over tbf, 3.9 s under load; issue 17)
                names = sorted(n for n, _ in layout)
                if self._stream is not None:
                    self._stream.layout = sorted(layout)
                    self._stream.mark, self._stream.covered = mark, sum(c for _, c in layout)
                self._announced = trio.from_thread.run_sync(
                    self._announce, names, mark, sum(c for _, c in layout))
                if st.level is None:
                    # the level before the copy, from the live pages: the chunks of a
                    # round streamed to a cold target are encoded as RAM is read
                    started = time.monotonic()
                    sample = sample_pages([live[n] for n in names])
                    st.mode, st.level = self._choose_level(sample)
                    self._level_s = time.monotonic() - started
                if self._stream is not None:
                    trio.from_thread.run_sync(self._stream.leveled.set)
                # the guest's dirty rate, early: every page scanned now and again after
                # the copy's first EARLY_SAMPLE_S (federation.migration.precopy)
                early = _EarlySample(live) if rescans else None
                total, copied = sum(c for _, c in layout), 0
                copy_started = time.monotonic()
                for name, count in layout:
                    # the digests and the index of what was copied from the bytes copied:
                    # no read of the (sealed) shadow back, and the index's SHA-256 of a
                    # piece on the other worker while the next piece is copied
                    sent = SentDigests.blank(count) if rescans else None
                    builder = IndexBuilder(count)
                    indexing: list[Future[None]] = []
                    for p in range(0, count, COPY_PAGES):
                        n = min(COPY_PAGES, count - p)
                        data = bytes(live[name].view(p, n))
                        st.shadows[name].write(p, data)
                        if self._stream is not None:
                            self._stream.copied(name, p, data)
                        if sent is not None:
                            sent.read(p, data)
                        if self._executor is None:
                            builder.add(p, data)
                        else:
                            indexing.append(self._executor.submit(builder.add, p, data))
                            if len(indexing) > 1:  # at most two pieces held
                                indexing.pop(0).result()
                        self._preparing(n)
                        copied += n
                        elapsed = time.monotonic() - copy_started
                        if early is not None and elapsed >= EARLY_SAMPLE_S and copied < total:
                            dirtied, seconds = early.sample(live)
                            trio.from_thread.run_sync(self._report, V3Preparing(
                                self.migration_id, self.round, self._prepared, dirtied,
                                seconds, elapsed * total / copied))
                            early = None
                    for fut in indexing:
                        fut.result()
                    self._built[name] = builder.index()
                    if sent is not None:
                        st.sent[name] = sent
                if rescans:
                    self._sample_dirty(live, time.monotonic() - copy_started)
                return sum(c for _, c in layout), {}, mark
            olds: dict[str, dict[int, bytes]] = {}
            covered = 0
            if rescans:
                # what differs from the shadow, whatever the guest wrote when (an A, B, A
                # page between two scans is found here, federation.vms.dirty_scan)
                for name in sorted(st.shadows):
                    shadow, src = st.shadows[name], live[name]
                    pages = st.sent[name].changed(src)
                    # the live pages read once, the old ones a chunk of the (sealed) shadow
                    # at a time; the digests from the bytes written, the encoder served
                    # from them (a sealed page read costs its 64 KiB chunk's decryption)
                    new = self._news[name] = {p: bytes(src.view(p)) for p in pages}
                    old = olds[name] = read_pages(shadow, pages)
                    for p in pages:
                        shadow.write(p, new[p])
                    st.sent[name].copied(shadow, pages, new)
                    st.unindexed.setdefault(name, set()).update(pages)
                    covered += len(pages)
                return covered, olds, mark
            for name, pages in b.dirty_since(a.vm, a.since).items():
                shadow, src, old = st.shadows[name], live[name], olds.setdefault(name, {})
                for p in pages:
                    covered += 1
                    if shadow.view(p) != src.view(p):
                        old[p] = bytes(shadow.view(p))
                        shadow.write(p, src.view(p))
                        st.unindexed.setdefault(name, set()).add(p)
            return covered, olds, mark
        finally:
            for img in live.values():
                img.close()

    def _sample_dirty(self, live: dict[str, Image], copy_seconds: float) -> None:
        """Worker thread, round 1: the pages the guest wrote while its shadow was copied
        (they differ from what was copied), reported with their mean exposure — half the
        copy, then this scan — so the round policy can throttle the guest before the
        round moves anything (federation.migration.precopy)."""
        st = self.state
        started = time.monotonic()
        dirtied = sum(len(st.sent[n].changed(img)) for n, img in live.items() if n in st.sent)
        exposure = copy_seconds / 2 + (time.monotonic() - started)
        trio.from_thread.run_sync(self._report, V3Preparing(
            self.migration_id, self.round, self._prepared, dirtied, exposure, copy_seconds))

    def _preparing(self, pages: int) -> None:
        """Worker thread: ``pages`` more prepared; the rounds core hears of it every
        _REPORT_S (V3Preparing: progress, so a long first preparation is not a stall)."""
        self._prepared += pages
        now = time.monotonic()
        if now >= self._next_prepared:
            self._next_prepared = now + _REPORT_S
            trio.from_thread.run_sync(self._report, V3Preparing(
                self.migration_id, self.round, self._prepared))

    def _indexes(self) -> dict[str, PageIndex]:
        """Each shadow's index: the last verified one refreshed over the pages changed
        since (a copy: the verified one stays the round's XOR reference), or built whole
        in a migration's first round. A fenced VM's final round takes the index of its
        stopped images the fence caught up: the refreshed shadow holds the same bytes
        (a page the shadow's 64-bit digests missed would show as a root that differs at
        the target, and the round fails)."""
        st = self.state
        fenced = (self._fenced_indexes(self.migration_id)
                  if self._fenced_indexes is not None and st.verified else None)
        if fenced is not None and set(fenced) == set(st.shadows) and all(
                fenced[n].page_count == img.page_count for n, img in st.shadows.items()):
            return fenced
        out = {}
        for n, img in st.shadows.items():
            held = st.verified.get(n)
            built = self._built.pop(n, None)
            if held is None and built is not None and built.page_count == img.page_count:
                out[n] = built  # round 1: indexed as it was copied (_refresh)
            elif held is None:
                out[n] = build_index(img, self._executor)
                self._preparing(img.page_count)
            else:
                ix = held[1].copy()
                ix.refresh(img, st.unindexed.get(n, ()), self._executor)
                out[n] = ix
        return out

    # ------------------------------------------------------------------ the round

    async def run(self) -> None:
        """The round, from the shadow's refresh to the verified images, within ``scope``
        (a cancel ends it); a failure is reported, never raised."""
        with self.scope:
            rest: BaseException | None = None
            try:
                await self._run()
            except BaseException as raised:
                exc = round_error(raised)
                if exc is None and isinstance(raised, BaseExceptionGroup):
                    # A round error beside a cancellation from outside (the node stopping
                    # while a stream failed: make netns-chaos seed 100): the round failed,
                    # and the cancellation goes on up to the scope it belongs to. Raised
                    # as one group, the round error came out of that scope alone and
                    # ended the node.
                    failed, rest = raised.split(_ROUND_ERRORS)
                    exc = None if failed is None else round_error(failed)
                    if exc is not None and rest is not None and not all(
                            isinstance(e, trio.Cancelled) for e in _leaves(rest)):
                        exc = None  # a bug beside it: raised whole, as before
                if exc is None:
                    raise
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    # The shadow filled the disk: its space is given back at once, or the
                    # abort (a ledger write to the same disk) and every other write of the
                    # node would wait for room that nothing frees (make netns-chaos, a
                    # 128 MiB guest's shadow on a small data disk). A later round of this
                    # migration starts from a fresh shadow (SourceState.reset).
                    self.state.close()
                self._report(V3Failed(self.migration_id, self.round, str(exc)))
                if rest is not None:
                    raise rest from None

    def _fenced_pages(self) -> tuple[dict[str, PageIndex], dict[str, Image],
                                     dict[str, list[int]]] | None:
        """Worker thread: a fenced VM's final round, when it can go straight from the
        stopped images: their index the fence caught up, the images (open: the caller
        closes them) and per image the pages that differ from what the target verified
        (their fingerprints differ between the two indexes: no scan of the images, the
        fence's catch-up scanned them). None: the round goes the usual way."""
        a, st = self.action, self.state
        if self._fenced_indexes is None or a.since is None:
            return None
        if not dirty_by_content(self.backend, a.vm) or any(st.unindexed.values()):
            return None
        fenced = self._fenced_indexes(self.migration_id)
        names = set(st.shadows)
        if fenced is None or set(fenced) != names or set(st.verified) != names:
            return None
        live = self.backend.open_images(a.vm)
        if set(live) != names or any(live[n].page_count != fenced[n].page_count
                                     for n in names):
            for img in live.values():
                img.close()
            return None
        return fenced, live, {n: differing_pages(st.verified[n][1], fenced[n])
                              for n in sorted(names)}

    async def _run(self) -> None:
        t0 = trio.current_time()
        fenced = await trio.to_thread.run_sync(self._fenced_pages)
        if fenced is not None:
            try:
                await self._run_fenced(t0, *fenced)
            finally:
                for img in fenced[1].values():
                    img.close()
            return
        stream = self._stream
        if stream is None:
            await self._diffed(t0)
            return
        # round 1: streamed from its copy if the target is cold, else diffed after it
        timing: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._streamed, stream, timing)
            await self._diffed(t0, stream, timing)

    async def _streamed(self, stream: _Stream, timing: dict[str, float]) -> None:
        """Round 1 to a cold target: at its word, the chunks of what the copy read so far,
        then of each piece as it is read; the offers once the copy and its index ended
        (:meth:`_offer_streamed`). Returns at once if the round is diffed instead."""
        st = self.state
        with stream.scope:
            await stream.leveled.wait()
            await self._go.wait()
            if not stream.cold():
                stream.decline()
                return
            level = st.level
            assert level is not None, "round 1 chooses its level before its copy"
            names = [n for n, _ in stream.layout]
            sources = {n: StreamSource(i, self.target, c, zero_index(c).root)
                       for i, (n, c) in enumerate(stream.layout)}
            images = [Overlay(st.shadows[n], {}) for n in names]

            def encode(i: int, e: EncodeChunk, at: int) -> bytes | bytearray:
                return encode_chunk(e.transfer, e.plan, images[i], None, at)

            feed = ChunkFeed(encode, level, LevelGovernor(level))
            # at a level that groups pages by similarity (the one rule, similar_at),
            # the lead goes in the order read while RAM is copied, the rest grouped
            # over the whole image at the copy's end
            keys = {n: similar_at(images[i], level) for i, n in enumerate(names)}
            grouping = all(k is not None for k in keys.values())
            stream.begin(sources, feed, STREAM_LEAD_PAGES if grouping else None)
        if stream.sources is None:
            return  # declined while waiting (the copy ended first, the target not cold)
        await self._move(names, list(sources.values()), feed, stream.mark, stream.covered,
                         timing, self._announced,
                         offers=functools.partial(self._offer_streamed, stream, feed, keys,
                                                  timing))

    async def _offer_streamed(self, stream: _Stream, feed: ChunkFeed,
                              keys: dict[str, Callable[[int], int | None] | None],
                              timing: dict[str, float]) -> None:
        """Once the copy and index ended: the pages beyond the lead grouped by similarity,
        then each streamed image's offer with its root."""
        await stream.indexed.wait()
        assert stream.sources is not None
        if stream.lead is not None:
            grouping = {n: k for n, k in keys.items() if k is not None}
            started = trio.current_time()
            grouped = await trio.to_thread.run_sync(stream.plan_rest, grouping)
            timing["grouped_pages"] = grouped
            timing["group_s"] = trio.current_time() - started
        for i, (name, _) in enumerate(stream.layout):
            self._apply(i, stream.sources[name].finish(stream.indexes[name]), feed)

    async def _diffed(self, t0: float, stream: _Stream | None = None,
                      timing: dict[str, float] | None = None) -> None:
        """The round's refresh and index, then (unless it is streamed: round 1 to a cold
        target, which :meth:`_streamed` moves) its diff or push."""
        a, st = self.action, self.state
        covered, olds, mark = await trio.to_thread.run_sync(self._refresh)
        t1 = trio.current_time()
        indexes = await trio.to_thread.run_sync(self._indexes)
        t2 = trio.current_time()
        if stream is not None:
            if stream.cold():
                assert timing is not None
                timing.update(refresh_s=t1 - t0 - self._level_s, index_s=t2 - t1,
                              level_s=self._level_s)
                stream.indexes = indexes
                stream.indexed.set()
                return
            stream.decline()
        names = sorted(indexes)
        announced = self._announced
        if st.level is None:
            # the round is announced before the level is measured (round 1: before its
            # copy, in _refresh): the target gets ready (its incoming images, its paused
            # QEMU) meanwhile, and the diff starts at its word (the level is needed only
            # for the first plan)
            if announced is None:
                announced = self._announce(names, mark, covered)
            sample = await trio.to_thread.run_sync(sample_pages, [st.shadows[n] for n in names])
            st.mode, st.level = await trio.to_thread.run_sync(self._choose_level, sample)
        t_level = trio.current_time()
        level = st.level
        assert level is not None, "the level is chosen in the migration's first v3 round"
        # the round's new pages from memory, the rest from the shadow
        images = [Overlay(st.shadows[n], self._news.get(n, {})) for n in names]
        refs: list[dict[bytes, Overlay]] = []
        sources: list[Source] = []
        for i, name in enumerate(names):
            held = st.verified.get(name)
            ref = {} if held is None else {held[0]: Overlay(st.shadows[name], olds.get(name, {}))}
            ref_ix = {} if held is None else {held[0]: held[1]}
            refs.append(ref)
            changed = olds.get(name, {})
            if held is not None and a.since is not None \
                    and st.unindexed.get(name, set()) == changed.keys():
                # the target verified ``held`` last round and this round's refresh is all
                # that changed since (no cancelled round's pages in between): push what
                # changed, no diff (federation.dataplane.v3_push)
                if name not in st.held_pages:  # once per migration (O(pages), pre-copy)
                    st.held_pages[name] = await trio.to_thread.run_sync(HeldPages, held[1])
                sources.append(PushSource(i, self.target, indexes[name], held[0],
                                          sorted(changed), st.held_pages[name],
                                          copies=st.copies))
            else:
                # at a high level, pages chunked by similarity (as LiveMigration's round 1),
                # each wanted page sketched while the diff still runs (SketchAhead)
                similar = similar_at(images[i], level)
                if similar is not None:
                    similar = self._sketches[i] = SketchAhead(images[i])
                sources.append(HdeSource(i + 1, self.target, f"{a.vm}/{name}", indexes[name],
                                         ref, ref_ix, similar))

        def encode(i: int, e: EncodeChunk, at: int) -> bytes | bytearray:
            ref = refs[i].get(e.reference_root) if e.reference_root is not None else None
            return encode_chunk(e.transfer, e.plan, images[i], ref, at,
                                copies=st.copies and is_push(e.transfer))

        # the level moves chunk by chunk so the link stays full (mesh.hde.level)
        feed = ChunkFeed(encode, level, LevelGovernor(level))
        async with trio.open_nursery() as nursery:
            for sketches in self._sketches.values():
                nursery.start_soon(functools.partial(trio.to_thread.run_sync, sketches.run))
            try:
                await self._move(names, sources, feed, mark, covered,
                                 {"refresh_s": t1 - t0 - self._level_s, "index_s": t2 - t1,
                                  "level_s": self._level_s + t_level - t2}, announced)
            finally:
                for sketches in self._sketches.values():
                    sketches.close()

    async def _run_fenced(self, t0: float, indexes: dict[str, PageIndex],
                          live: dict[str, Image], changed: dict[str, list[int]]) -> None:
        """The final round of a fenced VM straight from its stopped images: the pages that
        differ from what the target verified, pushed against it, indexed by the fence's
        catch-up. The shadow is not written (nothing comes after this round; an abort
        drops it): no copy, and no read of the old pages for an XOR, whose only gain is
        bytes (docs/qemu.md, "Downtime")."""
        a, st = self.action, self.state
        level = st.level
        assert level is not None, "a fenced VM had a first round"
        names = sorted(indexes)
        sources: list[Source] = []
        for i, name in enumerate(names):
            if name not in st.held_pages:
                st.held_pages[name] = await trio.to_thread.run_sync(HeldPages,
                                                                    st.verified[name][1])
            sources.append(PushSource(i, self.target, indexes[name], st.verified[name][0],
                                      changed[name], st.held_pages[name], copies=st.copies))

        def encode(i: int, e: EncodeChunk, at: int) -> bytes | bytearray:
            return encode_chunk(e.transfer, e.plan, live[names[i]], None, at,
                                copies=st.copies)

        # the stop window: the level the last round ended at, held (no time to adapt)
        assert a.since is not None
        await self._move(names, sources, ChunkFeed(encode, level), a.since,
                         sum(len(p) for p in changed.values()),
                         {"refresh_s": trio.current_time() - t0, "index_s": 0.0, "fenced": 1})

    def _announce(self, names: list[str], mark: int, covered: int) -> float:
        """Report the prepared round (the rounds core announces it to the target); the
        time it was reported."""
        a = self.action
        self._report(V3Prepared(a.migration_id, a.round, mark, covered, tuple(names)))
        return trio.current_time()

    async def _move(self, names: list[str], sources: list[Source],
                    feed: ChunkFeed, mark: int, covered: int, timing: dict[str, float],
                    announced: float | None = None,
                    offers: Callable[[], Awaitable[None]] | None = None) -> None:
        """Announce the prepared round (unless it was, at ``announced``), then once the
        target is ready move it: the diff or the pushes over the control link, the chunks
        over AMST, until every image is verified; the verified indexes become the next
        round's reference. A streamed round's sources start themselves: ``offers`` sends
        their offers when they are due."""
        a, st, level = self.action, self.state, self.state.level
        t3 = announced if announced is not None else self._announce(names, mark, covered)
        prepared = trio.current_time()
        await self._go.wait()
        t4 = trio.current_time()
        # the wait for the target's word once the round was prepared (ready_s counts from
        # the announcement, which in round 1 comes before the copy)
        timing["go_wait_s"] = t4 - prepared
        self._go_at = time.monotonic()  # the feed's clock
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._transfer, transfer_id(a.migration_id, a.round), feed,
                               lambda: all(s.verified for s in sources))
            if offers is None:
                for i, s in enumerate(sources):
                    assert not isinstance(s, StreamSource), "a streamed round has offers"
                    self._apply(i, s.start(), feed)
            else:
                nursery.start_soon(offers)
            await self._drive(sources, feed)
            feed.close()
        for name, s in zip(names, sources, strict=True):
            pages = st.held_pages.get(name)
            if isinstance(s, PushSource) and pages is not None:
                pages.advance(st.verified[name][1], s.index, s.pages)
            else:
                st.held_pages.pop(name, None)  # an HDE round: built again when needed
            assert s.index is not None, "a verified image was indexed"
            st.verified[name] = (s.index.root, s.index)
        st.unindexed = {}
        t5 = trio.current_time()
        # where the round's time went (the final round's is most of the downtime)
        timing.update(ready_s=t4 - t3, transfer_s=t5 - t4)
        # how full the link was: the round's bytes over the transfer's time, and what
        # kept the wire waiting (the first chunk's delay, the preparers' wait for plans)
        wire_bytes = self.control_bytes + self.chunk_bytes
        timing.update(encode_s=feed.encode_s, starved_s=feed.starved_s)
        if feed.first_frame_at is not None:
            timing.update(first_chunk_s=max(0.0, feed.first_frame_at - self._go_at))
        if t5 > t4:
            timing.update(wire_MBps=wire_bytes / (t5 - t4) / 1e6)
        if feed.levels:
            # the next round starts where this one's governor left the level
            st.level = feed.level
        figures = {**{k: round(v, 4) for k, v in timing.items()},
                   "level_start": level, "levels": {str(k): v for k, v in
                                                    sorted(feed.levels.items())},
                   "level_steps": feed.level_steps(self._go_at),
                   "pushed": sum(isinstance(s, PushSource) for s in sources),
                   "streamed": sum(isinstance(s, StreamSource) for s in sources),
                   "copies": sum(isinstance(s, PushSource) and s.chunk_copies
                                 for s in sources),
                   "level": max(feed.levels, key=feed.levels.__getitem__) if feed.levels
                   else level, "mode": st.mode, "chunks": feed.frames,
                   "chunk_bytes": feed.frame_bytes, "control_bytes": self.control_bytes,
                   "resent": self.resent, "replayed": feed.replayed, "streams": self.streams,
                   "sketched_ahead": sum(sk.ahead for sk in self._sketches.values()),
                   "sketched_late": sum(sk.on_the_spot for sk in self._sketches.values())}
        self._report(V3Verified(a.migration_id, a.round, self.control_bytes + self.chunk_bytes,
                                figures))

    async def _transfer(self, tid: bytes, feed: ChunkFeed, verified: Callable[[], bool]) -> None:
        """The round's AMST transfer, started again after every cut the rounds core
        resumes, until it completes or the images are verified (what is left is end
        markers)."""
        while True:
            core = AmstSender(tid, mode=self.state.mode)
            feed.bind(core.acked, *_progress_of(core))
            done = True
            try:
                sent = await send_transfer(
                    tid, feed, connect=self._connect, new_channel=self._channel,
                    prepare=feed.prepare, preparers=PREPARERS, core=core)
            except TransferCut as exc:
                reason, done = str(exc), False
                written = (exc.written_chunks, exc.written_bytes)
            else:
                written = (sent.written_chunks, sent.written_bytes)
            self._learn_offer()
            self.chunk_bytes += written[0] * AMST_CHUNK_OVERHEAD + written[1]
            self.resent += core.resent
            self.streams = max(self.streams, core.max_streams_up)
            if done or verified():
                return
            self._resume = trio.Event()
            self._report(V3Cut(self.migration_id, self.round, core.acked_bytes, reason))
            await self._resume.wait()
            feed.resume()

    def _channel(self) -> SecureChannel:
        ch = self._new_channel()
        self._channels.append(ch)
        return ch

    def _learn_offer(self) -> None:
        """Whether the target decodes chunk copies, from the offer of the last data
        channel of this round whose handshake completed (the next rounds use it; a
        target that restarted with an older build is told apart at its next handshake)."""
        for ch in reversed(self._channels):
            if ch.peer_versions:
                self.state.copies = versions.both_offer(versions.HDE_COPIES, ch.versions,
                                                        ch.peer_versions)
                break
        self._channels.clear()

    def _send_control(self, msg: Any) -> None:
        raw = wire.encode(msg)
        if not self._send(self.target, msg):
            raise RoundFailed(f"the control link to {self.target} is down or full")
        self.control_bytes += len(raw)

    def _apply(self, i: int, actions: list[Any], feed: ChunkFeed) -> None:
        a = self.action
        for act in actions:
            if isinstance(act, Send):
                self._send_control(V3Hde(a.migration_id, a.round, i, wire.encode(act.message)))
            elif isinstance(act, EncodeChunk):
                feed.put(i, act)
            elif isinstance(act, Notify) and act.kind == "hde.failed":
                raise RoundFailed(f"HDE image {i}: {act.detail['reason']}")

    async def _drive(self, sources: list[Source], feed: ChunkFeed) -> None:
        """Answer the target's diff until every image is verified, reporting what moved
        every _REPORT_S (the rounds core bounds a round where nothing moves)."""
        next_report = trio.current_time() + _REPORT_S
        moved, frames = False, feed.frames
        while not all(s.verified for s in sources):
            if any(s.verified is False for s in sources):
                raise RoundFailed(f"{self.target} assembled an image whose root differs")
            msg = None
            with trio.move_on_at(next_report):
                msg = await self._inbox.receive()
            now = trio.current_time()
            if msg is not None:
                moved = True
                await self._on_diff(now, msg, sources, feed)
            if now >= next_report:
                moved = moved or feed.frames != frames
                self._report(V3Moved(self.migration_id, self.round, moved, feed.frame_bytes,
                                     feed.pages))
                moved, frames, next_report = False, feed.frames, now + _REPORT_S

    async def _on_diff(self, now: float, msg: V3Hde, sources: list[Source],
                       feed: ChunkFeed) -> None:
        self.control_bytes += len(wire.encode(msg))
        if msg.image >= len(sources):
            raise RoundFailed(f"{self.target} named image {msg.image} of {len(sources)}")
        try:
            inner = wire.decode(msg.body)
        except wire.WireError as exc:
            raise RoundFailed(f"{self.target} sent a bad HDE message: {exc}") from None
        if isinstance(inner, V3Held):
            return  # what the target holds, heard after the round started: not needed
        # in a worker thread: a want planned by similarity sketches every page it names
        # (~0.5 CPU s for a 256 MiB guest) and a fingerprint reply compresses up to 1 MiB;
        # on the event loop either would stall the AMST streams' writes meanwhile. The
        # source's cores are touched by this task only, one message at a time.
        sketches = self._sketches.get(msg.image)
        if sketches is not None and isinstance(inner, HdeWant):
            if inner.flush:
                sketches.close()  # the diff is over: the plan sketches what is left
            else:
                sketches.want(inner.ranges)
        event = Received(self.target, inner, msg.body)
        source = sources[msg.image]

        def handle() -> list[Any]:
            return list(source.handle(now, event))

        self._apply(msg.image, await trio.to_thread.run_sync(handle), feed)


class V3Sender:
    """A node's v3 source side: each migration's shadow state, and the round it sends
    now. ``connector(migration_id, target)`` says how a round's streams reach the
    target (direct, or through a relay); ``level_for(target)`` how its chunk level is
    chosen."""

    def __init__(
        self,
        *,
        shadow_dir: Path,
        backend: VmBackend,
        send: Callable[[str, Any], bool],
        connector: Callable[[str, str], Connect],
        new_channel: Callable[[str], SecureChannel],
        level_for: Callable[[str], Callable[[list[bytes]], tuple[str, int]]],
        report: Report,
        executor: Executor | None = None,
        scratch_key: SealKey | None = None,
        fenced_indexes: Callable[[str], dict[str, PageIndex] | None] | None = None,
    ) -> None:
        self.shadow_dir = shadow_dir
        #: seals the shadows (federation.dataplane.v3_shadow); None: plain shadows
        self.scratch_key = scratch_key
        #: migration id -> the indexes of its fenced VM's images caught up after the stop
        #: (federation.vms.actions.VmActions.fenced_indexes), or None
        self.fenced_indexes = fenced_indexes
        self.backend = backend
        self._send = send
        self._connector = connector
        self._new_channel = new_channel
        self._level_for = level_for
        self._report = report
        self._executor = executor
        #: migration id -> its shadow state (kept until the migration ends here)
        self.sources: dict[str, SourceState] = {}
        #: migration id -> the round it sends now
        self.rounds: dict[str, V3RoundSender] = {}
        #: migrations whose state is dropped once their running round's task ends
        self._drop_after: set[str] = set()
        self.nursery: trio.Nursery | None = None

    def shadow_digests(self, migration_id: str) -> dict[str, tuple[PageIndex, bytes]] | None:
        """Per image the index and group digests of the shadow the target verified (after
        round 1 of a VM tracked by content), or None: what the source's live index starts
        from instead of a pass over RAM of its own (VmActions, a small touch here)."""
        st = self.sources.get(migration_id)
        if st is None or not st.verified or set(st.verified) != set(st.sent):
            return None
        return {n: (st.verified[n][1], bytes(st.sent[n].groups)) for n in st.verified}

    def prepare(self, action: V3Prepare) -> None:
        assert self.nursery is not None, "rounds start only while the node runs"
        mid = action.migration_id
        state = self.sources.get(mid)
        if state is None:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", mid)  # one path component
            state = self.sources[mid] = SourceState(self.shadow_dir / safe, self.scratch_key)
        target = action.target
        sender = V3RoundSender(
            action, self.backend, state, send=self._send,
            connect=self._connector(mid, target), new_channel=lambda: self._new_channel(target),
            choose_level=self._level_for(target), report=self._report, executor=self._executor,
            fenced_indexes=self.fenced_indexes)
        old = self.rounds.get(mid)
        if old is not None:
            old.scope.cancel()
        self.rounds[mid] = sender
        self.nursery.start_soon(self._run, sender)

    async def _run(self, sender: V3RoundSender) -> None:
        mid = sender.migration_id
        try:
            await sender.run()
        finally:
            if self.rounds.get(mid) is sender:
                del self.rounds[mid]
            if mid in self._drop_after and mid not in self.rounds:
                self._drop_after.discard(mid)
                self._close(mid)

    def _round(self, mid: str, round_: int | None = None) -> V3RoundSender | None:
        sender = self.rounds.get(mid)
        if sender is None or (round_ is not None and sender.round != round_):
            return None
        return sender

    def go(self, mid: str, round_: int) -> None:
        sender = self._round(mid, round_)
        if sender is not None:
            sender.go()

    def resume(self, mid: str, round_: int) -> None:
        sender = self._round(mid, round_)
        if sender is not None:
            sender.resume()

    def cancel(self, mid: str) -> None:
        """Stop the round: its task ends at its next checkpoint (a worker thread it waits
        for finishes first; the state stays until :meth:`drop`)."""
        sender = self.rounds.get(mid)
        if sender is not None:
            sender.scope.cancel()

    def deliver(self, peer: str, msg: V3Hde) -> bool:
        """A diff message for a round this DC sends to ``peer``, if there is one."""
        sender = self.rounds.get(msg.migration_id)
        if sender is None or sender.target != peer:
            return False
        sender.deliver(msg)
        return True

    def drop(self, mid: str) -> None:
        """The migration ended here: drop its shadow state (after its running round)."""
        if mid in self.rounds:
            self._drop_after.add(mid)
            self.cancel(mid)
        else:
            self._close(mid)

    def _close(self, mid: str) -> None:
        state = self.sources.pop(mid, None)
        if state is not None:
            state.close()

    def close(self) -> None:
        for mid in list(self.sources):
            self._close(mid)
