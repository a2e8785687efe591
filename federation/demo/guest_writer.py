"""The page writer: a deterministic stand-in for a guest's workload on an image VM.

It dirties pages at a set rate the way a running guest does — it rewrites a
64-byte record inside a page (a counter, a list node, a cache line), it does
not fill pages with noise — and it logs every write, so a test can check that
the copy of the VM at its owner is exactly what the writer last wrote before
the fence.

Which page and which bytes is a pure function of ``(seed, sequence number)``
(:class:`WritePlan`) plus the page's old bytes, so a run is reproducible and
the logic is tested without a thread. :class:`WriterThread` only paces it.

The log is a redo log, one JSON line per write::

    {"seq": 7, "image": "memory", "page": 12, "offset": 640, "data": "<64 bytes hex>",
     "sha256": "<hex of the whole page after the write>"}

A batch of writes is appended and fsynced *before* it touches the image;
after a batch is applied and the image flushed, a ``{"applied": seq}`` line
marks it. On open, every write after the last mark is applied again (writes
are absolute bytes, so re-applying in order is idempotent). Whatever crash
happened, the image then equals the replay of the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import attrs

from federation.vms.image_backend import MappedImage
from mesh.hde.image import PAGE_SIZE, Image

__all__ = [
    "RECORD_BYTES",
    "HOT_SHARE",
    "HOT_FRACTION",
    "DISK_SHARE",
    "WriterLogError",
    "PageWrite",
    "WritePlan",
    "PageWriter",
    "WriterThread",
    "read_log",
    "expected_pages",
    "mismatches",
]

#: Bytes rewritten per write: one x86 cache line pair (2 x 64 B would be a record
#: spanning lines; 64 B is what a counter or list-node update dirties).
RECORD_BYTES = 64
#: Clark et al., "Live Migration of Virtual Machines" (NSDI 2005) §3.4/§5: a
#: guest's writes concentrate on a small *writable working set*; most of a
#: round's dirty pages are the same hot pages again. The writer models that
#: with 90 % of memory writes inside a hot set of 1/16 of memory and the rest
#: uniform, so pre-copy converges and every round still has a tail to send.
HOT_SHARE = 0.9
HOT_FRACTION = 1 / 16
#: Share of writes that go to disks (when the VM has any): page-cache write-back is
#: a small part of a guest's dirtying next to RAM.
DISK_SHARE = 0.1
#: Batches between checkpoints (msync + "applied" mark): bounds the redo on open.
CHECKPOINT_BATCHES = 16
#: Pacing tick of the thread: 20 ms keeps batches small at 10^4 pages/s and the
#: fsyncs of the log at 50/s.
TICK = 0.02

_U64 = float(2**64)
#: A log line is ~300 bytes; a torn one is found within the last 64 KiB.
_TAIL_BYTES = 64 * 1024


class WriterLogError(ValueError):
    """A writer log line that is complete but not a record (the message names the line)."""


@attrs.frozen
class PageWrite:
    seq: int
    image: str
    page: int
    offset: int


class WritePlan:
    """Which page and offset write ``seq`` touches, from ``seed`` alone."""

    def __init__(self, seed: int, layout: Mapping[str, int]) -> None:
        if "memory" not in layout:
            raise ValueError("a writer needs a memory image")
        self.seed = seed.to_bytes(8, "big", signed=False)
        self.memory_pages = layout["memory"]
        self.disks = tuple(sorted((n, c) for n, c in layout.items() if n != "memory"))
        self.hot_pages = max(1, int(self.memory_pages * HOT_FRACTION))
        start = int.from_bytes(hashlib.blake2b(self.seed, digest_size=8).digest(), "big")
        self.hot_start = start % (self.memory_pages - self.hot_pages + 1)

    def _draw(self, seq: int) -> bytes:
        return hashlib.blake2b(
            self.seed + seq.to_bytes(8, "big"), digest_size=32, person=b"dwcp-writer"
        ).digest()

    def choose(self, seq: int) -> PageWrite:
        d = self._draw(seq)
        u_target = int.from_bytes(d[0:8], "big") / _U64
        u_hot = int.from_bytes(d[8:16], "big") / _U64
        pick = int.from_bytes(d[16:24], "big")
        offset = (int.from_bytes(d[24:26], "big") % (PAGE_SIZE // RECORD_BYTES)) * RECORD_BYTES
        if self.disks and u_target < DISK_SHARE:
            name, count = self.disks[pick % len(self.disks)]
            return PageWrite(seq, name, (pick >> 16) % count, offset)
        if u_hot < HOT_SHARE:
            return PageWrite(seq, "memory", self.hot_start + pick % self.hot_pages, offset)
        return PageWrite(seq, "memory", pick % self.memory_pages, offset)

    def record(self, seq: int, old: bytes) -> bytes:
        """The new bytes of write ``seq`` over the record's ``old`` bytes."""
        return hashlib.blake2b(old + self.seed + seq.to_bytes(8, "big"),
                               digest_size=RECORD_BYTES).digest()


def read_log(path: Path) -> Iterator[dict[str, object]]:
    """Every complete line of a writer log (a torn last line, from a crash mid-append,
    is skipped: its batch was never fsynced, so it was never applied either)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise WriterLogError(f"{path}:{number}: not a log record: {exc}") from None
            if not isinstance(rec, dict):
                raise WriterLogError(f"{path}:{number}: not a log record")
            yield rec


def expected_pages(path: Path) -> dict[tuple[str, int], str]:
    """(image, page) -> sha256 hex of the last write the log holds for that page."""
    out: dict[tuple[str, int], str] = {}
    for rec in read_log(path):
        if "seq" in rec:
            out[(str(rec["image"]), int(rec["page"]))] = str(rec["sha256"])  # type: ignore[call-overload]
    return out


def mismatches(images: Mapping[str, Image], expected: Mapping[tuple[str, int], str]) -> list[str]:
    """Pages whose content differs from what the writer last wrote (empty: intact)."""
    bad = []
    for (img, page), sha in sorted(expected.items()):
        image = images.get(img)
        if image is None or page >= image.page_count:
            bad.append(f"{img}:{page} missing")
        elif hashlib.sha256(image.view(page)).hexdigest() != sha:
            bad.append(f"{img}:{page} differs")
    return bad


class PageWriter:
    """Applies :class:`WritePlan` writes to mapped images and logs them (see module doc)."""

    def __init__(self, images: Mapping[str, MappedImage], log_path: Path, seed: int,
                 on_write: Callable[[str, int], None] | None = None) -> None:
        self.images = dict(images)
        self.plan = WritePlan(seed, {n: img.page_count for n, img in self.images.items()})
        self.on_write = on_write
        self.log_path = log_path
        self.seq = 0
        self._batches = 0
        self._redo()
        self._log = open(log_path, "ab")

    def _cut_torn_tail(self) -> None:
        """Drop a last line a crash left half-written, so the next append starts a line."""
        if not self.log_path.exists():
            return
        with open(self.log_path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            tail = min(size, _TAIL_BYTES)
            f.seek(size - tail)
            end = f.read(tail).rfind(b"\n")
            keep = size - tail + end + 1
            if keep != size and (end >= 0 or size <= _TAIL_BYTES):
                f.truncate(keep)
                os.fsync(f.fileno())

    def _redo(self) -> None:
        self._cut_torn_tail()
        pending: list[dict[str, object]] = []
        last = -1
        for rec in read_log(self.log_path):
            if "applied" in rec:
                pending = []
            else:
                pending.append(rec)
                last = int(rec["seq"])  # type: ignore[call-overload]
        for rec in pending:
            view = self.images[str(rec["image"])].view(int(rec["page"]))  # type: ignore[call-overload]
            off = int(rec["offset"])  # type: ignore[call-overload]
            view[off : off + RECORD_BYTES] = bytes.fromhex(str(rec["data"]))
        if pending:
            self._flush_images()
        self.seq = last + 1

    def _flush_images(self) -> None:
        for img in self.images.values():
            img.flush()

    def write(self, count: int) -> int:
        """Make ``count`` writes: log them (fsync), then apply them. Returns the next seq."""
        if count <= 0:
            return self.seq
        plan = self.plan
        staged: dict[tuple[str, int], bytearray] = {}
        lines = []
        writes = []
        for seq in range(self.seq, self.seq + count):
            w = plan.choose(seq)
            key = (w.image, w.page)
            page = staged.get(key)
            if page is None:
                page = staged[key] = bytearray(self.images[w.image].view(w.page))
            data = plan.record(seq, bytes(page[w.offset : w.offset + RECORD_BYTES]))
            page[w.offset : w.offset + RECORD_BYTES] = data
            writes.append((w, data))
            lines.append(json.dumps({
                "seq": seq, "image": w.image, "page": w.page, "offset": w.offset,
                "data": data.hex(), "sha256": hashlib.sha256(page).hexdigest(),
            }, sort_keys=True).encode() + b"\n")
        self._log.write(b"".join(lines))
        self._log.flush()
        os.fsync(self._log.fileno())
        for w, data in writes:
            self.images[w.image].view(w.page)[w.offset : w.offset + RECORD_BYTES] = data
            if self.on_write is not None:
                self.on_write(w.image, w.page)
        self.seq += count
        self._batches += 1
        if self._batches % CHECKPOINT_BATCHES == 0:
            self.checkpoint()
        return self.seq

    def checkpoint(self) -> None:
        """Flush the images, then mark every logged write as applied."""
        self._flush_images()
        self._log.write(json.dumps({"applied": self.seq - 1}).encode() + b"\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log.closed:
            return
        self.checkpoint()
        self._log.close()
        for img in self.images.values():
            img.close()


class WriterThread:
    """Runs a :class:`PageWriter` at ``rate`` writes per second until :meth:`stop`."""

    def __init__(self, writer: PageWriter, rate: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.writer = writer
        self.rate = rate
        self.clock = clock
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dwcp-page-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        t0 = self.clock()
        done = 0
        try:
            while not self._stop.is_set():
                due = int((self.clock() - t0) * self.rate) - done
                if due > max(1.0, self.rate):
                    # more than a second behind (the process was stalled): skip ahead
                    # rather than burst, as a paused guest does not catch up either
                    done += due - max(1, int(self.rate))
                    due = max(1, int(self.rate))
                if due > 0:
                    self.writer.write(due)
                    done += due
                self._stop.wait(TICK)  # pacing to the rate, not a stand-in for work
        except BaseException as exc:  # reported by stop(), never swallowed
            self.error = exc

    def stop(self) -> None:
        """Stop and return only when every write is applied, logged and flushed."""
        self._stop.set()
        self._thread.join()
        self.writer.close()
        if self.error is not None:
            raise RuntimeError(f"page writer failed: {self.error}") from self.error
