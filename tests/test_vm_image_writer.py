"""The page writer: deterministic choices, in-place record updates, a redo log that always
replays to the image, and a fence that stops every write."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.demo.guest_backend import WriterSetting, WritingBackend
from federation.demo.guest_writer import (
    HOT_FRACTION,
    RECORD_BYTES,
    PageWriter,
    WritePlan,
    WriterLogError,
    expected_pages,
    mismatches,
    read_log,
)
from federation.vms.backend import VmError, VmState
from federation.vms.image_backend import map_writable
from mesh.hde.image import PAGE_SIZE
from tests.harness.data import real_pages
from tests.harness.waiting import poll_until

LAYOUT = {"memory": 1024, "disk-0": 64}


@given(st.integers(0, 2**64 - 1), st.integers(0, 10**9))
def test_plan_is_a_pure_function_of_seed_and_seq(seed: int, seq: int) -> None:
    a, b = WritePlan(seed, LAYOUT), WritePlan(seed, LAYOUT)
    w = a.choose(seq)
    assert w == b.choose(seq)
    assert 0 <= w.page < LAYOUT[w.image]
    assert w.offset % RECORD_BYTES == 0 and w.offset + RECORD_BYTES <= PAGE_SIZE
    assert a.record(seq, b"x" * 64) == b.record(seq, b"x" * 64) != a.record(seq, b"y" * 64)


def test_writes_concentrate_on_a_hot_set() -> None:
    plan = WritePlan(7, LAYOUT)
    writes = [plan.choose(s) for s in range(20_000)]
    images = collections.Counter(w.image for w in writes)
    assert 0.08 < images["disk-0"] / len(writes) < 0.12
    hot = range(plan.hot_start, plan.hot_start + plan.hot_pages)
    mem = [w.page for w in writes if w.image == "memory"]
    assert plan.hot_pages == int(1024 * HOT_FRACTION)
    assert sum(p in hot for p in mem) / len(mem) > 0.88
    assert WritePlan(8, LAYOUT).choose(0) != plan.choose(0) or WritePlan(8, LAYOUT).hot_start \
        != plan.hot_start


def make_images(tmp_path: Path) -> dict[str, object]:
    out = {}
    for name, pages in LAYOUT.items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(real_pages(pages, name.encode()))
        out[name] = map_writable(path, pages, name)
    return out


def test_writer_mutates_records_in_place_and_logs_them(tmp_path: Path) -> None:
    images = make_images(tmp_path)
    before = {n: bytes(img.view(0, img.page_count)) for n, img in images.items()}  # type: ignore[attr-defined]
    seen: list[tuple[str, int]] = []
    w = PageWriter(images, tmp_path / "writer.log", seed=3,  # type: ignore[arg-type]
                   on_write=lambda i, p: seen.append((i, p)))
    assert w.write(500) == 500
    first = next(iter(read_log(tmp_path / "writer.log")))
    assert first["seq"] == 0 and len(bytes.fromhex(str(first["data"]))) == RECORD_BYTES
    # a changed page differs from its old content in whole 64-byte records only
    img, page = str(first["image"]), int(first["page"])  # type: ignore[call-overload]
    new = bytes(images[img].view(page))  # type: ignore[attr-defined]
    old = before[img][page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    diff = [i for i in range(0, PAGE_SIZE, RECORD_BYTES)
            if new[i : i + RECORD_BYTES] != old[i : i + RECORD_BYTES]]
    assert diff and len(diff) < 16
    assert len(seen) == 500
    w.close()  # closes the images it wrote
    reopened = {n: map_writable(tmp_path / f"{n}.img", c, n) for n, c in LAYOUT.items()}
    assert mismatches(reopened, expected_pages(tmp_path / "writer.log")) == []


def test_same_seed_same_images(tmp_path: Path) -> None:
    digests = []
    for run in ("a", "b"):
        d = tmp_path / run
        d.mkdir()
        images = make_images(d)
        w = PageWriter(images, d / "writer.log", seed=11)  # type: ignore[arg-type]
        w.write(300)
        digests.append({n: hashlib.sha256(img.view(0, img.page_count)).hexdigest()  # type: ignore[attr-defined]
                        for n, img in images.items()})
        w.close()
    assert digests[0] == digests[1]


def test_log_replays_after_a_crash_between_log_and_image(tmp_path: Path) -> None:
    images = make_images(tmp_path)
    log = tmp_path / "writer.log"
    w = PageWriter(images, log, seed=5)  # type: ignore[arg-type]
    w.write(100)
    w.close()
    # A crash after the log was fsynced but before the batch reached the image: run the
    # next batch on a copy of the VM (images and log), then give our log its records.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    copies = {}
    for n, c in LAYOUT.items():
        (scratch / f"{n}.img").write_bytes((tmp_path / f"{n}.img").read_bytes())
        copies[n] = map_writable(scratch / f"{n}.img", c, n)
    (scratch / "writer.log").write_bytes(log.read_bytes())
    ghost = PageWriter(copies, scratch / "writer.log", seed=5)
    assert ghost.seq == 100
    ghost.write(40)
    ghost.close()
    lines = [ln for ln in (scratch / "writer.log").read_bytes().splitlines(keepends=True)
             if json.loads(ln).get("seq", -1) >= 100]
    assert len(lines) == 40
    assert mismatches({n: map_writable(tmp_path / f"{n}.img", c, n) for n, c in LAYOUT.items()},
                      expected_pages(scratch / "writer.log")) != []  # ours lacks the batch
    with open(log, "ab") as f:
        f.writelines(lines)
        f.write(b'{"seq": 999, "torn')  # and a torn last line
    images2 = {n: map_writable(tmp_path / f"{n}.img", c, n) for n, c in LAYOUT.items()}
    w2 = PageWriter(images2, log, seed=5)
    assert w2.seq == 140
    assert mismatches(images2, expected_pages(log)) == []  # type: ignore[arg-type]
    w2.write(5)  # appends start on a fresh line: the torn one is gone
    w2.close()
    records = list(read_log(log))
    assert [r["seq"] for r in records if "seq" in r] == list(range(145))


def test_backend_writer_runs_until_the_fence(tmp_path: Path) -> None:
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(256))
    b = WritingBackend(tmp_path / "vms")
    b.import_vm("a", mem)
    with pytest.raises(VmError, match="positive"):
        b.attach_writer("a", seed=1, rate=0)
    b.attach_writer("a", seed=1, rate=5000)  # stopped VM: attached, not writing
    assert b.writer("a") is None
    mark = b.dirty_mark("a")
    b.start("a", 0)
    thread = b.writer("a")
    assert thread is not None
    poll_until(lambda: thread.writer.seq >= 200, "200 writes by the writer thread")
    b.fence("a", "m1")
    assert b.writer("a") is None and b.info("a").state is VmState.FENCED
    log = b.path("a") / "writer.log"
    expected = expected_pages(log)
    dirty = b.dirty_since("a", mark)
    assert sorted(p for _, p in expected) == dirty["memory"]
    images = b.open_images("a")
    assert mismatches(images, expected) == []
    frozen = hashlib.sha256(images["memory"].view(0, 256)).digest()
    assert hashlib.sha256(images["memory"].view(0, 256)).digest() == frozen
    for img in images.values():
        img.close()
    n_logged = sum(1 for r in read_log(log) if "seq" in r)
    b.release_fence("a", "m1")  # the writer resumes where the log ends
    assert b.writer("a") is not None
    b.close()
    assert sum(1 for r in read_log(log) if "seq" in r) >= n_logged
    assert mismatches(b.open_images("a"), expected_pages(log)) == []


def test_an_incoming_copy_forgets_the_old_copys_writer(tmp_path: Path) -> None:
    """A VM that comes back reuses its retired copy in place: the old writer's log is set
    aside (it describes content the migration replaces) and the writer is not resumed."""
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(64))
    b = WritingBackend(tmp_path / "vms")
    b.import_vm("a", mem)
    b.attach_writer("a", seed=3, rate=500)
    b.start("a", 0)
    b.fence("a", "m1")
    b.retire("a", "m1")
    assert (b.path("a") / "writer.log").exists()
    writers = b.prepare_incoming("a", [("memory", 64)], "m/9")
    for w in writers.values():
        w.close()
    assert (b.path("a") / "writer.log.before-m_9").exists()
    assert not (b.path("a") / "writer.log").exists()
    b.start("a", 2)
    assert b.writer("a") is None
    with pytest.raises(VmError, match="positive"):
        WritingBackend(tmp_path / "other", {"a": WriterSetting(1, 0.0)})
    b.close()


def test_a_corrupt_log_line_is_named(tmp_path: Path) -> None:
    log = tmp_path / "writer.log"
    log.write_bytes(b'{"applied": 3}\n[1, 2]\n')
    with pytest.raises(WriterLogError, match=r"writer.log:2"):
        list(read_log(log))
    log.write_bytes(b'{"applied": 3}\nnot json\n')
    with pytest.raises(WriterLogError, match=r"writer.log:2: not a log record"):
        expected_pages(log)


def test_a_dead_writer_does_not_block_the_fence(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    mem = tmp_path / "mem.raw"
    mem.write_bytes(real_pages(32))
    b = WritingBackend(tmp_path / "vms")
    b.import_vm("a", mem)

    def full_disk(self: PageWriter, count: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PageWriter, "write", full_disk)
    b.attach_writer("a", seed=1, rate=1000)
    b.start("a", 0)
    thread = b.writer("a")
    assert thread is not None
    poll_until(lambda: thread.error is not None, "the writer thread hitting the full disk")
    assert b.fence("a", "m1").state is VmState.FENCED
    assert "No space left" in b.writer_errors["a"]
