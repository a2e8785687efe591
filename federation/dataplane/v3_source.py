"""The source side of the v3 data plane (see :mod:`federation.dataplane.v3_protocol`): one
round of a migration as HDE transfers of its images, chunks over AMST to the target's data endpoint.

A cut data path does not end the round. AMST itself re-opens broken streams and re-sends
their unacknowledged chunks, but gives up once every stream failed a few times in a row
(:data:`mesh.amst.sender.MAX_FAILURES`); the round then resumes the transfer with a new
sender after a backoff. The target's receiver outlives the streams and answers the new
ones with what it already holds, and the chunk feed offers again only the frames not
acknowledged (:class:`federation.dataplane.v3_protocol.ChunkFeed`), so nothing the target stored
crosses twice. Only when the path stays cut past :data:`RESUME_BUDGET_S` (or
:data:`RESUMES` resumes in a row bring nothing through) does the round fail, and the
session aborts in the ledger with the VM still at its source."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import trio

from federation.dataplane.v1 import ACK_TIMEOUT, RoundFailed
from federation.dataplane.v3_protocol import (
    AMST_CHUNK_OVERHEAD,
    SAMPLE_PAGES,
    ChunkFeed,
    Overlay,
    V3Hde,
    V3Round,
    V3Status,
    transfer_id,
)
from federation.migration.vocabulary import RoundSent, SendRound, TransferProgress
from federation.vms.backend import VmBackend
from mesh import wire
from mesh.amst.sender import BACKOFF_MAX_S, BACKOFF_MIN_S, AmstSender
from mesh.channel import SecureChannel
from mesh.core import Notify, Received, Send
from mesh.hde.codec import encode_chunk
from mesh.hde.events import EncodeChunk
from mesh.hde.image import PAGE_SIZE, ImageWriter, create_image
from mesh.hde.index import PageIndex, build_index
from mesh.hde.source import HdeSource
from mesh.runtime.amst_transfer import SendReport, TransferCut, send_transfer

__all__ = ["SourceState", "V3RoundSender", "PREPARERS", "RESUME_BUDGET_S", "RESUMES"]

#: Chunks encoded at once: one per core of the reference machine (2 cores); zstd
#: releases the GIL, so both work (DESIGN.md, "Transport").
PREPARERS = 2
#: Pages copied into the shadow per slice: 16 MiB, so a huge image is copied without a
#: huge temporary and the worker thread stays responsive to cancellation.
_COPY_PAGES = 4096
#: Progress goes to the session at least this often while a round runs: the v1 sender's
#: period (federation.dataplane.v1), far inside the session's stall timer (30 s).
_REPORT_S = 1.0
#: How long a round's data path may stay cut (no chunk acknowledged) before the round
#: fails: half the sessions' stall timer (federation.migration.vocabulary.STALL_TIMEOUT, 30 s). The
#: target's session hears of no chunk meanwhile, so the source gives up — and aborts with
#: the reason — well before the target's stall timer would abort on its own.
RESUME_BUDGET_S = 15.0
#: Resumes in a row that bring no chunk through before the round fails. Their waits double
#: from AMST's reconnect backoff (mesh.amst.sender: 0.2 s, RFC 6298 doubling, at most 5 s),
#: so 8 resumes span about 21 s of waiting: the time budget, not the count, normally ends
#: a long cut; the count bounds the attempts when every attempt fails at once.
RESUMES = 8


class SourceState:
    """What a migration's source keeps between v3 rounds: the shadow images (the content
    the target verified last round, refreshed at each round start), their last verified
    roots and indexes (the XOR reference), and the chunk level chosen in round 1."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.shadows: dict[str, ImageWriter] = {}
        self.verified: dict[str, tuple[bytes, PageIndex]] = {}
        self.level: int | None = None
        self.mode = ""

    def reset(self, layout: Sequence[tuple[str, int]]) -> None:
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shadows = {n: create_image(self.directory / f"{n}.img", c, f"shadow/{n}")
                        for n, c in layout}

    def close(self) -> None:
        for img in self.shadows.values():
            img.close()
        self.shadows = {}
        self.verified = {}
        shutil.rmtree(self.directory, ignore_errors=True)


def _sample(images: Sequence[ImageWriter]) -> list[bytes]:
    """Up to SAMPLE_PAGES non-uniform pages spread over the images, in 64-page pieces."""
    total = sum(i.page_count for i in images)
    stride = max(1, total // (4 * SAMPLE_PAGES))
    pages: list[bytes] = []
    for img in images:
        for p in range(0, img.page_count, stride):
            page = bytes(img.view(p))
            if page.count(page[0]) != PAGE_SIZE:
                pages.append(page)
                if len(pages) == SAMPLE_PAGES:
                    break
        if len(pages) == SAMPLE_PAGES:
            break
    return [b"".join(pages[i : i + 64]) for i in range(0, len(pages), 64)]


class V3RoundSender:
    """Sends one v3 round; ``deliver`` is fed the target's :class:`V3Hde`/:class:`V3Status`."""

    version = 3

    def __init__(
        self,
        action: SendRound,
        target: str,
        backend: VmBackend,
        state: SourceState,
        marks: dict[str, int],
        *,
        send: Callable[[str, Any], bool],
        connect: Callable[[], Awaitable[trio.abc.Stream]],
        new_channel: Callable[[], SecureChannel],
        choose_level: Callable[[list[bytes]], tuple[str, int]],
        executor: Executor | None = None,
        resume_budget: float = RESUME_BUDGET_S,
    ) -> None:
        self.action = action
        self.target = target
        self.backend = backend
        self.state = state
        self.marks = marks
        self._send = send
        self._connect = connect
        self._new_channel = new_channel
        self._choose_level = choose_level
        self._executor = executor
        self.resume_budget = resume_budget
        self._inbox_send, self._inbox = trio.open_memory_channel[Any](1024)
        self.control_bytes = 0
        #: AMST transfers resumed after a cut, and chunks re-sent by AMST over all of them
        self.resumes = 0
        self.resent = 0
        self.streams = 0
        #: bytes of the chunk frames written whole to AMST streams, every copy counted
        self.chunk_bytes = 0
        #: figures of the round, for the node's log
        self.figures: dict[str, Any] = {}

    def deliver(self, msg: V3Hde | V3Status) -> None:
        if msg.migration_id == self.action.migration_id and msg.round == self.action.round:
            try:
                self._inbox_send.send_nowait(msg)
            except trio.WouldBlock:  # a flooding peer: the round fails on its own stall
                pass

    # ------------------------------------------------------------------ the shadow

    def _refresh(self) -> tuple[int, dict[str, dict[int, bytes]]]:
        """Worker thread: bring the shadow up to the live images. Returns the logical pages
        the round covers and, per image, the old bytes of the pages that changed."""
        a, b, st = self.action, self.backend, self.state
        previous = self.marks.get(a.migration_id)
        mark = b.dirty_mark(a.vm)  # before reading: a later write shows in the next round
        self.marks[a.migration_id] = mark
        layout = b.info(a.vm).layout
        live = b.open_images(a.vm)
        try:
            if not a.dirty or previous is None or set(st.shadows) != {n for n, _ in layout}:
                st.reset(layout)
                for name, count in layout:
                    for p in range(0, count, _COPY_PAGES):
                        n = min(_COPY_PAGES, count - p)
                        st.shadows[name].copy(live[name], p, p, n)
                return sum(c for _, c in layout), {}
            olds: dict[str, dict[int, bytes]] = {}
            covered = 0
            for name, pages in b.dirty_since(a.vm, previous).items():
                shadow, src, old = st.shadows[name], live[name], olds.setdefault(name, {})
                for p in pages:
                    covered += 1
                    if shadow.view(p) != src.view(p):
                        old[p] = bytes(shadow.view(p))
                        shadow.write(p, src.view(p))
            return covered, olds
        finally:
            for img in live.values():
                img.close()

    def _indexes(self) -> dict[str, PageIndex]:
        return {n: build_index(img, self._executor) for n, img in self.state.shadows.items()}

    # ------------------------------------------------------------------ the round

    async def run(self, progress: Callable[[TransferProgress], Awaitable[None]]) -> RoundSent:
        a, st = self.action, self.state
        started = trio.current_time()
        covered, olds = await trio.to_thread.run_sync(self._refresh)
        indexes = await trio.to_thread.run_sync(self._indexes)
        names = sorted(indexes)
        if st.level is None:
            sample = await trio.to_thread.run_sync(_sample, [st.shadows[n] for n in names])
            st.mode, st.level = await trio.to_thread.run_sync(self._choose_level, sample)
        level = st.level
        assert level is not None, "the level is chosen in the migration's first v3 round"
        refs: list[dict[bytes, Overlay]] = []
        sources: list[HdeSource] = []
        for i, name in enumerate(names):
            held = st.verified.get(name)
            ref = {} if held is None else {held[0]: Overlay(st.shadows[name], olds.get(name, {}))}
            ref_ix = {} if held is None else {held[0]: held[1]}
            refs.append(ref)
            sources.append(HdeSource(i + 1, self.target, f"{a.vm}/{name}", indexes[name],
                                     ref, ref_ix))

        def encode(i: int, e: EncodeChunk) -> bytes | bytearray:
            ref = refs[i].get(e.reference_root) if e.reference_root is not None else None
            return encode_chunk(e.transfer, e.plan, st.shadows[names[i]], ref, level)

        feed = ChunkFeed(encode)
        tid = transfer_id(a.migration_id, a.round)
        self._send_control(V3Round(a.migration_id, a.round, tid, tuple(names)))
        await self._expect_ready()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._transfer, tid, feed,
                               lambda: all(s.verified for s in sources))
            for i, s in enumerate(sources):
                self._apply(i, s.start(), feed)
            await self._drive(sources, feed, progress)
            feed.close()
        for name, s in zip(names, sources, strict=True):
            st.verified[name] = (s.index.root, s.index)
        wire_bytes = self.control_bytes + self.chunk_bytes
        mark = self.marks[a.migration_id]
        dirty = await trio.to_thread.run_sync(self.backend.dirty_since, a.vm, mark)
        seconds = trio.current_time() - started
        self.figures = {"level": level, "mode": st.mode, "chunks": feed.frames,
                        "chunk_bytes": feed.frame_bytes, "control_bytes": self.control_bytes,
                        "resent": self.resent, "resumes": self.resumes,
                        "replayed": feed.replayed, "streams": self.streams}
        return RoundSent(a.round, covered, covered * PAGE_SIZE, wire_bytes, seconds,
                         sum(len(p) for p in dirty.values()))

    async def _transfer(self, tid: bytes, feed: ChunkFeed, verified: Callable[[], bool],
                        ) -> SendReport | None:
        """The round's AMST transfer, resumed after every cut until it completes, the
        images are verified (what is left is end markers), or the cut outlasts the budget."""
        cut_since: float | None = None
        delay = BACKOFF_MIN_S
        in_a_row = 0
        while True:
            core = AmstSender(tid, mode=self.state.mode)
            feed.bind(core.acked)
            report: SendReport | None = None
            try:
                report = await send_transfer(
                    tid, feed, connect=self._connect, new_channel=self._new_channel,
                    prepare=feed.prepare, preparers=PREPARERS, core=core)
            except TransferCut as exc:
                reason = str(exc)
                written = (exc.written_chunks, exc.written_bytes)
            else:
                written = (report.written_chunks, report.written_bytes)
            self.chunk_bytes += written[0] * AMST_CHUNK_OVERHEAD + written[1]
            self.resent += core.resent
            self.streams = max(self.streams, core.max_streams_up)
            if report is not None:
                return report
            now = trio.current_time()
            if verified():
                return None
            if cut_since is None or core.acked_bytes > 0:  # chunks got through: a new cut
                cut_since, delay, in_a_row = now, BACKOFF_MIN_S, 0
            in_a_row += 1
            if now - cut_since >= self.resume_budget or in_a_row > RESUMES:
                raise RoundFailed(f"AMST to {self.target} cut for {now - cut_since:.1f} s "
                                  f"({in_a_row - 1} resumes): {reason}")
            await trio.sleep(min(delay, max(0.0, cut_since + self.resume_budget - now)))
            delay = min(BACKOFF_MAX_S, 2 * delay)
            self.resumes += 1
            feed.resume()

    def _send_control(self, msg: Any) -> None:
        raw = wire.encode(msg)
        if not self._send(self.target, msg):
            raise RoundFailed(f"the control link to {self.target} is down or full")
        self.control_bytes += len(raw)

    async def _expect_ready(self) -> None:
        with trio.move_on_after(ACK_TIMEOUT):
            async for msg in self._inbox:
                if isinstance(msg, V3Status):
                    if msg.error:
                        raise RoundFailed(f"{self.target} refused round {msg.round}: "
                                          f"{msg.error}")
                    return
        raise RoundFailed(f"{self.target} did not get ready for round {self.action.round} "
                          f"in {ACK_TIMEOUT:.0f} s")

    def _apply(self, i: int, actions: list[Any], feed: ChunkFeed) -> None:
        a = self.action
        for act in actions:
            if isinstance(act, Send):
                self._send_control(V3Hde(a.migration_id, a.round, i, wire.encode(act.message)))
            elif isinstance(act, EncodeChunk):
                feed.put(i, act)
            elif isinstance(act, Notify) and act.kind == "hde.failed":
                raise RoundFailed(f"HDE image {i}: {act.detail['reason']}")

    async def _drive(self, sources: list[HdeSource], feed: ChunkFeed,
                     progress: Callable[[TransferProgress], Awaitable[None]]) -> None:
        """Answer the target's diff until every image is verified (or fail the round when
        nothing moves for ACK_TIMEOUT)."""
        a = self.action
        quiet_since = trio.current_time()
        moved = feed.frames
        while not all(s.verified for s in sources):
            if any(s.verified is False for s in sources):
                raise RoundFailed(f"{self.target} assembled an image whose root differs")
            msg = None
            with trio.move_on_after(_REPORT_S):
                msg = await self._inbox.receive()
            now = trio.current_time()
            if msg is None:
                if feed.frames != moved:
                    moved, quiet_since = feed.frames, now
                elif now - quiet_since > ACK_TIMEOUT:
                    raise RoundFailed(f"round {a.round}: no progress with {self.target} in "
                                      f"{ACK_TIMEOUT:.0f} s")
                await progress(TransferProgress(a.round, feed.frame_bytes))
                continue
            quiet_since = now
            if isinstance(msg, V3Status):
                if msg.error:
                    raise RoundFailed(f"{self.target}: {msg.error}")
                continue
            self.control_bytes += len(wire.encode(msg))
            if msg.image >= len(sources):
                raise RoundFailed(f"{self.target} named image {msg.image} of {len(sources)}")
            try:
                inner = wire.decode(msg.body)
            except wire.WireError as exc:
                raise RoundFailed(f"{self.target} sent a bad HDE message: {exc}") from None
            self._apply(msg.image, sources[msg.image].handle(
                now, Received(self.target, inner, msg.body)), feed)
