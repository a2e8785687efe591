"""A live migration of a qemu VM between two backends of one process (docs/qemu.md).

Until the node's rounds core drives the qemu backend, this is how a running guest moves
from one :class:`~federation.vms.qemu_backend.QemuBackend` to another, and what the
tests and ``dwcp bench live`` run. It uses HDE as the product does:

1. pre-copy round 1: copy every image into the source's *shadow* while the guest runs,
   index it, and run an HDE transfer into the target's incoming images (diff against the
   target's older copy, dedup, zstd);
2. round k: scan the live images against the digests of the shadow
   (:class:`~federation.vms.dirty_scan.SentDigests`: what differs from what was sent,
   so a page that changed and changed back is never missed), copy those pages into the
   shadow, send them as HDE chunks (XOR against the page the target holds), refresh both
   page indexes over the changed pages only and compare the roots;
3. when the estimated final round fits the downtime limit (or after ``max_rounds``):
   fence (QMP ``stop``), save the device state (QEMU's migration stream with
   ``x-ignore-shared``: no RAM), a final round of what differs from the shadow,
   roots compared again over the changed blocks, the target QEMU (started with
   ``-incoming defer`` during pre-copy) loads the device state, ``cont``; the source
   retires. Downtime is ``stop`` to ``cont``.

Between ``stop`` and ``cont`` nothing hashes, copies or sends the whole image except the
dirty scan (:mod:`federation.vms.dirty_scan`: a pass of XXH3 over RAM, because these
kernels have no soft-dirty bits); verification is :meth:`mesh.hde.index.PageIndex.refresh`
over the changed blocks (1 MiB of SHA-256 each, on both sides).

Any failure before the target runs aborts: the target's copy is discarded (its QEMU
powered off) and the source resumes with ``cont``, exactly as it was.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor

import attrs

from federation.vms.backend import VmError
from federation.vms.dirty_scan import SentDigests
from federation.vms.qemu_backend import QemuBackend
from mesh.hde.codec import decode_chunk, encode_chunk, grouped_plans, xor_pages
from mesh.hde.image import PAGE_SIZE, Image, ImageWriter, Overlay
from mesh.hde.index import PageIndex, build_index
from mesh.hde.loopback import Carry, Frame, run_transfer
from mesh.hde.similar import similar_at
from mesh.hde.store import PageStore

__all__ = ["LiveMigration", "MigrationReport", "RoundFigures", "DOWNTIME_LIMIT_S",
           "MAX_ROUNDS", "in_process"]

#: QEMU's default downtime-limit is 300 ms (migration/options.c,
#: DEFAULT_MIGRATE_SET_DOWNTIME); issue 17 sets DWCP's to the same.
DOWNTIME_LIMIT_S = 0.3
#: The datacenter mode's round limit (DESIGN.md, "The ledger and a migration").
MAX_ROUNDS = 5
#: zstd level 1: QEMU's multifd-zstd default (DEFAULT_MIGRATE_MULTIFD_ZSTD_LEVEL), so the
#: first comparison is at the same level.
LEVEL = 1
#: What the stop window costs besides the scan and the pages, measured on the
#: self-checking guest (dwcp bench live, shared machine): stop 1-7 ms, device-state save
#: 12-20 ms, load and cont 15-42 ms.
FIXED_STOP_S = 0.07


@attrs.frozen
class RoundFigures:
    round: int
    pages: int
    wire_bytes: int
    seconds: float
    #: pages that changed while the round ran (the next round's work)
    dirty_after: int


@attrs.define
class MigrationReport:
    rounds: list[RoundFigures] = attrs.field(factory=list)
    final_pages: int = 0
    final_wire_bytes: int = 0
    device_state_bytes: int = 0
    downtime_s: float = 0.0
    #: stop window, phase -> seconds
    stop_window: dict[str, float] = attrs.field(factory=dict)
    verified_blocks: int = 0
    #: seconds verification added to the rounds (hashing changed blocks): the target's
    #: index refresh and the wait for the source's, which runs beside the transfer
    verify_s: float = 0.0
    total_s: float = 0.0
    root: dict[str, bytes] = attrs.field(factory=dict)

    @property
    def wire_bytes(self) -> int:
        return (sum(r.wire_bytes for r in self.rounds) + self.final_wire_bytes
                + self.device_state_bytes)


def in_process(frames: Iterable[Frame], to_target: bool) -> list[Frame]:
    """The identity :data:`~mesh.hde.loopback.Carry`: both backends in this process."""
    return list(frames)


def _sink(writer: ImageWriter) -> Callable[[int], ImageWriter]:
    """HDE's sink factory, answered with the incoming image the backend prepared."""
    return lambda _pages: writer


class LiveMigration:
    """Moves VM ``name`` from ``source`` to ``target`` (see module doc). ``carry`` takes
    every byte the target needs — diff messages both ways, chunk frames, the device state,
    the target's root after each round — over a real path (``dwcp bench live`` passes a
    TCP connection through a counting relay or a 100 Mbit/s veth pair) or none
    (:func:`in_process`); the target side only ever uses what arrived. ``executor`` runs
    indexing and encoding."""

    def __init__(self, source: QemuBackend, target: QemuBackend, name: str,
                 migration_id: str, *, level: int = LEVEL,
                 downtime_limit: float = DOWNTIME_LIMIT_S, max_rounds: int = MAX_ROUNDS,
                 executor: Executor | None = None, carry: Carry = in_process,
                 final_xor: bool = False) -> None:
        self.source, self.target, self.name = source, target, name
        self.migration_id = migration_id
        self.level = level
        self.downtime_limit = downtime_limit
        self.max_rounds = max_rounds
        #: indexing, block digests and HDE encoding: one thread per core of the reference
        #: machine (2), as the v3 data plane's preparers (federation.dataplane.v3_source)
        self._own_executor = executor is None
        self.executor: Executor = executor or ThreadPoolExecutor(2)
        self.carry = carry
        #: XOR deltas in the final round too. Off by default: measured on 2,200 pages
        #: rewritten in place, XOR made the frames 10x smaller (155 KB vs 1.6 MB) but
        #: encoding 5.6x and applying 2.3x slower, and in the stop window CPU time is
        #: downtime; over a link slower than the encoder the bytes win (the node decides
        #: from its link estimate, issue 17 second part). Pre-copy rounds always XOR.
        self.final_xor = final_xor
        self.report = MigrationReport()
        self._shadow: dict[str, ImageWriter] = {}
        self._src_ix: dict[str, PageIndex] = {}
        self._dst_ix: dict[str, PageIndex] = {}
        self._writers: dict[str, ImageWriter] = {}
        self._sent: dict[str, SentDigests] = {}
        #: the scan that closed the last round (its ``dirty_after``): the next pre-copy
        #: round sends these pages instead of scanning all of RAM again. Pages that change
        #: after that scan are not lost: every scan compares the live image with what was
        #: sent, so the next one (at the latest the final round's) finds them.
        self._pending: dict[str, list[int]] | None = None
        #: the source's live images, mapped once for the whole migration: a fresh mapping
        #: per scan faults every page in again (a 256 MiB scan took 200 ms through a fresh
        #: mapping, 80 ms through a held one, under load), and the final scan is downtime
        self._live: dict[str, Image] = {}
        #: refreshes the source's index while the same pages are encoded, carried,
        #: applied and re-indexed at the target (its own thread: the refresh itself waits
        #: on ``executor``, so it must not occupy one of that pool's workers)
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="dwcp-live-verify")
        #: how long the last dirty scan took (a pass over every image)
        self._scan_s = 0.0
        self._fenced = False
        self._started = 0.0
        self._transfer = 0

    # ------------------------------------------------------------------ the whole run

    def run(self, epoch: int) -> MigrationReport:
        """Pre-copy until the final round fits, then switch over; abort on any failure."""
        try:
            self.precopy()
            return self.switch_over(epoch)
        except BaseException:
            self.abort()
            raise

    def precopy(self) -> None:
        """Round 1, then incremental rounds until the estimated stop window fits the
        downtime limit (at least one incremental round: the final round runs that path,
        so its cost per page is measured there) or ``max_rounds`` have run."""
        self._started = time.monotonic()
        self.first_round()
        while len(self.report.rounds) < self.max_rounds:
            last = self.report.rounds[-1]
            if last.round > 1 and self.estimate_stop_s(last.dirty_after) <= self.downtime_limit:
                break
            self.next_round()

    def estimate_stop_s(self, pages: int) -> float:
        """The final round's expected stop window for ``pages`` changed pages: the fixed
        costs, one dirty scan as long as the last one took, and the pages at the cost per
        page of the last incremental round (copy, encode, apply, verify)."""
        last = self.report.rounds[-1]
        per_page = (max(0.0, last.seconds - 2 * self._scan_s) / last.pages
                    if last.round > 1 and last.pages else 0.0)
        return FIXED_STOP_S + self._scan_s + pages * per_page

    # ------------------------------------------------------------------ rounds

    def first_round(self) -> None:
        src, dst, name = self.source, self.target, self.name
        started = time.monotonic()
        layout = src.info(name).layout
        held_here = self._held(layout)
        self._writers = dst.prepare_incoming(name, layout, self.migration_id,
                                             src.machine_spec(name))
        dst.prepare_machine(name)  # QEMU's start-up happens now, not in the downtime
        live = self._live = src.open_images(name)
        wire = 0
        for img, count in layout:
            # one pass: bytearray(n) would zero all of it first (CPython memsets a new
            # bytearray), a second write over the whole image before the copy
            shadow = ImageWriter(bytearray(live[img].view(0, count)), f"shadow/{img}")
            self._shadow[img] = shadow
            self._sent[img] = SentDigests(shadow)
        for img, _ in layout:
            ix = build_index(self._shadow[img], self.executor)
            self._src_ix[img] = ix
            store = PageStore()
            writer = self._writers[img]
            base_ix = None
            if img in held_here:
                base_ix = build_index(writer, self.executor)
                store.add(f"{name}/{img}", writer, base_ix)
            self._transfer += 1
            result = run_transfer(image=self._shadow[img], index=ix, name=f"{name}/{img}",
                                  store=store, level=self.level, executor=self.executor,
                                  make_sink=_sink(writer), transfer=self._transfer,
                                  carry=self.carry, sink_index=base_ix,
                                  similar=similar_at(self._shadow[img], self.level))
            writer.written = None  # later rounds refresh over the pages they send
            if not result.verified:
                raise VmError(f"VM {name!r}: round 1 of {img} failed: {result.failure}")
            held = store.base(f"{name}/{img}")
            assert held is not None and held.index.root == ix.root
            self._dst_ix[img] = held.index
            wire += result.wire_bytes
        self._pending = self.changed()
        self.report.rounds.append(RoundFigures(
            1, sum(c for _, c in layout), wire, time.monotonic() - started,
            sum(len(p) for p in self._pending.values())))

    def changed(self) -> dict[str, list[int]]:
        """Per image, the pages whose live content differs from what the target holds."""
        started = time.monotonic()
        try:
            return {img: pages for img, sent in sorted(self._sent.items())
                    if (pages := sent.changed(self._live[img]))}
        finally:
            self._scan_s = time.monotonic() - started

    def _held(self, layout: tuple[tuple[str, int], ...]) -> set[str]:
        """The images of which the target holds an older copy (a RETIRED one) of the same
        size: the incoming images are mapped over those files, so each is the diff's base
        as it stands, indexed before round 1 writes a page (mesh.hde.target resolves a
        page it already overwrote by its key; the root is refreshed over what was
        written). No copy of it: that copy took ~1.9 s of a return trip's round 1 under
        load, and round 1's length is what the next round has to send again."""
        try:
            held = self.target.open_images(self.name)
        except VmError:
            return set()
        try:
            return {img for img, count in layout
                    if (old := held.get(img)) is not None and old.page_count == count}
        finally:
            for image in held.values():
                image.close()

    def next_round(self) -> None:
        """Send what the scan that closed the last round found (one scan per round: the
        one after it is both this round's ``dirty_after`` and the next round's work)."""
        started = time.monotonic()
        dirty = self._pending if self._pending is not None else self.changed()
        pages, wire = self._send_changed(dirty)
        self._pending = self.changed()
        self.report.rounds.append(RoundFigures(
            len(self.report.rounds) + 1, pages, wire, time.monotonic() - started,
            sum(len(p) for p in self._pending.values())))

    def _send_changed(self, dirty: dict[str, list[int]], xor: bool = True) -> tuple[int, int]:
        """Copy ``dirty`` pages live -> shadow, send them as chunks (``xor``: each XORed
        against the page the target holds where that is smaller), refresh both indexes
        over them and compare the roots. Returns (pages, wire bytes)."""
        live = self._live  # mapped until the migration ends (_close_live)
        moved = wire = 0
        for img, pages in sorted(dirty.items()):
            shadow, src = self._shadow[img], live[img]
            old = {p: bytes(shadow.view(p)) for p in pages} if xor else {}
            for p in pages:
                shadow.write(p, src.view(p))
            self._sent[img].copied(shadow, pages)
            # the source's refresh overlaps the encoding, the carry and the target's
            # apply and refresh (it only reads the shadow, as the encoder does)
            src_refresh = self._verifier.submit(self._src_ix[img].refresh, shadow,
                                                pages, self.executor)
            reference = Overlay(shadow, old) if xor else None
            writer = self._writers[img]
            self._transfer += 1
            tid = self._transfer
            # equal pages in one chunk, each sent once (mesh.hde.codec): 17-23 % of the
            # pages a round of the bench guest sends equal another page of the round
            plans = grouped_plans(shadow, pages)
            encode = functools.partial(encode_chunk, tid, image=shadow, reference=reference,
                                       level=self.level, copies=True)
            frames = self.executor.map(encode, plans)
            for frame in self.carry(frames, True):
                wire += len(frame)
                chunk = decode_chunk(frame, tid, writer.page_count)
                for j, p in enumerate(chunk.pages):
                    data = chunk.data[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]
                    writer.write(p, xor_pages(data, writer.view(p)) if chunk.xor[j]
                                 else data)
            t = time.monotonic()
            blocks = self._dst_ix[img].refresh(writer, pages, self.executor)
            src_refresh.result()
            # what verification added to the round: the target's refresh and the wait
            # for the source's (the part of it not hidden behind the transfer)
            self.report.verify_s += time.monotonic() - t
            self.report.verified_blocks += len(blocks)
            # the target answers with its root: the source compares what arrived
            root = bytes(self.carry([self._dst_ix[img].root], False)[0])
            wire += len(root)
            if root != self._src_ix[img].root:
                raise VmError(f"VM {self.name!r}: {img} differs at the target after "
                              f"{len(pages)} changed pages")
            moved += len(pages)
        return moved, wire

    # ------------------------------------------------------------------ switch-over

    def switch_over(self, epoch: int) -> MigrationReport:
        """Fence, final round, start at the target, retire the source; the downtime is
        from the fence's ``stop`` to the target's ``cont``."""
        rep = self.report
        t0 = time.monotonic()
        state = self.fence()
        t1 = time.monotonic()
        verify_before = rep.verify_s
        self.final_round()
        t2 = time.monotonic()
        self.target.start(self.name, epoch, state)
        t3 = time.monotonic()
        self._close_live()  # after cont: unmapping the source's RAM is not downtime
        rep.downtime_s = t3 - t0
        final_verify = rep.verify_s - verify_before
        rep.stop_window.update(final_round=t2 - t1 - rep.stop_window["dirty_scan"]
                               - final_verify, final_verify=final_verify,
                               load_and_cont=t3 - t2)
        rep.root = {img: ix.root for img, ix in sorted(self._dst_ix.items())}
        self.source.retire(self.name, self.migration_id)
        self._close()
        rep.total_s = time.monotonic() - self._started
        return rep

    def fence(self) -> bytes:
        """Stop the source guest (QMP ``stop``) and save its device state."""
        t0 = time.monotonic()
        self.source.fence(self.name, self.migration_id)
        self._fenced = True
        t1 = time.monotonic()
        state = bytes(self.carry([self.source.device_state(self.name, self.migration_id)],
                                 True)[0])
        self.report.device_state_bytes = len(state)
        self.report.stop_window.update(stop=t1 - t0, device_state=time.monotonic() - t1)
        return state

    def final_round(self) -> None:
        """With the source stopped: send what differs from what was sent, verify."""
        rep = self.report
        t0 = time.monotonic()
        dirty = self.changed()
        rep.stop_window["dirty_scan"] = time.monotonic() - t0
        # No flush afterwards: the target QEMU maps the same files and sees the page cache.
        rep.final_pages, rep.final_wire_bytes = self._send_changed(dirty, self.final_xor)

    def abort(self) -> None:
        """Discard the target's copy and resume the source exactly as it was."""
        try:
            self.target.discard_incoming(self.name, self.migration_id)
        finally:
            self._close()
            if self._fenced:
                self.source.release_fence(self.name, self.migration_id)
                self._fenced = False

    def _close_live(self) -> None:
        for image in self._live.values():
            image.close()
        self._live = {}

    def _close(self) -> None:
        self._close_live()
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
        self._shadow = {}
        self._sent = {}
        self._pending = None
        self._verifier.shutdown()
        if self._own_executor:
            self.executor.shutdown()
