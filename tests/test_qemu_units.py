"""The qemu backend's pieces that need no QEMU: the VM spec and command line, dirty
tracking by rescan, incremental index refresh, the guest console parser."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.demo.qemu_guest.build import guest_cmdline
from federation.demo.qemu_guest.console import read_console
from federation.vms import accel
from federation.vms.backend import VmError
from federation.vms.dirty_scan import PageScan, SentDigests, changed_pages, scan_digests
from federation.vms.qemu_machine import socket_path
from federation.vms.qemu_spec import VmSpec, qemu_argv
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.index import BLOCK_PAGES, build_index

GOOD = {"kernel": "/k", "initrd": "/i", "memory_mib": 128}


def test_spec_round_trips_and_names_bad_fields(tmp_path: Path) -> None:
    spec = VmSpec.from_dict({**GOOD, "qemu_args": ["-cpu", "qemu64"], "smp": 2})
    assert VmSpec.from_json(spec.to_json()) == spec
    for bad, field in [({"memory_mib": 8}, "memory_mib"), ({"memory_mib": True}, "memory_mib"),
                       ({"kernel": ""}, "kernel"), ({"initrd": "/a,b"}, "initrd"),
                       ({"smp": 0}, "smp"), ({"qemu_args": "-S"}, "qemu_args"),
                       ({"qemu_args": ["-incoming", "tcp:0:1"]}, "qemu_args"),
                       ({"append": "a\nb"}, "append"), ({"colour": 1}, "unknown keys")]:
        with pytest.raises(VmError, match=field):
            VmSpec.from_dict({**GOOD, **bad})
    with pytest.raises(VmError, match="not JSON"):
        VmSpec.from_json(b"{")
    toml = tmp_path / "vm.toml"
    toml.write_text('kernel = "/k"\ninitrd = "/i"\nmemory_mib = 64\ndisks = ["d.img"]\n')
    spec, disks = VmSpec.from_toml(toml)
    assert spec.memory_mib == 64 and disks == [tmp_path / "d.img"]
    toml.write_text("kernel = [")
    with pytest.raises(VmError, match="vm.toml"):
        VmSpec.from_toml(toml)


def test_command_line_puts_ram_in_a_shared_file_and_source_equals_target(tmp_path: Path) -> None:
    spec = VmSpec.from_dict({**GOOD, "append": guest_cmdline(0, True)})
    args = ("qemu", spec, "tcg", tmp_path / "ram", [tmp_path / "d0"], tmp_path / "con",
            tmp_path / "q", tmp_path / "pid")
    src, dst = qemu_argv(*args, incoming=False), qemu_argv(*args, incoming=True)
    assert f"mem-path={tmp_path / 'ram'},share=on" in src[src.index("-object") + 1]
    assert dst[: len(src)] == src and dst[len(src):] == ["-S", "-incoming", "defer"]
    with pytest.raises(VmError, match="','"):
        qemu_argv("qemu", spec, "tcg", tmp_path / "a,b", [], tmp_path / "c", tmp_path / "q",
                  tmp_path / "p", False)
    long = tmp_path / ("x" * 200)
    assert len(str(socket_path(long, "qmp"))) < 108


def _image(pages: int, rng: random.Random) -> ImageWriter:
    return ImageWriter(bytearray(b"".join(rng.randbytes(PAGE_SIZE) for _ in range(pages))))


def test_sent_digests_catch_a_page_that_changed_back_but_generations_do_not() -> None:
    rng = random.Random(3)
    live = _image(8, rng)
    a = bytes(live.view(5))
    scan = PageScan()
    mark = scan.mark({"memory": live})
    live.write(5, rng.randbytes(PAGE_SIZE))  # B: a migration copies the page now
    shadow = ImageWriter(bytearray(live.view(0, 8)))
    sent = SentDigests(shadow)
    live.write(5, a)  # and back to A before the next round
    assert scan.since({"memory": live}, mark) == {}  # content-based generations miss it
    assert sent.changed(live) == [5]  # what was sent differs: re-sent
    shadow.write(5, live.view(5))
    sent.copied(shadow, [5])
    assert sent.changed(live) == []


@given(st.integers(1, 700), st.lists(st.integers(0, 699), max_size=40), st.integers(0, 99))
def test_changed_pages_is_exactly_the_pages_that_differ(n: int, writes: list[int],
                                                        seed: int) -> None:
    rng = random.Random(seed)
    img = ImageWriter(bytearray(n * PAGE_SIZE))
    before = scan_digests(img)
    pages = sorted({w % n for w in writes})
    for p in pages:
        img.write(p, bytes([1 + rng.randrange(255)]) * PAGE_SIZE)
    assert changed_pages(before, scan_digests(img)) == pages


@given(st.sampled_from([1, BLOCK_PAGES - 1, BLOCK_PAGES, BLOCK_PAGES + 1, 17 * BLOCK_PAGES + 5]),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=30), st.integers(0, 99))
def test_index_refresh_equals_a_full_rebuild(n: int, writes: list[int], seed: int) -> None:
    rng = random.Random(seed)
    img = ImageWriter(bytearray(n * PAGE_SIZE))
    ix = build_index(img)
    pages = [w % n for w in writes]
    for p in pages:
        img.write(p, rng.randbytes(PAGE_SIZE))
    blocks = ix.refresh(img, pages)
    full = build_index(img)
    assert blocks == sorted({p // BLOCK_PAGES for p in pages})
    assert ix.root == full.root and bytes(ix.fps) == bytes(full.fps)
    assert [bytes(level) for level in ix.levels] == [bytes(level) for level in full.levels]


def test_index_refresh_refuses_an_image_of_another_size() -> None:
    ix = build_index(ImageWriter(bytearray(4 * PAGE_SIZE)))
    with pytest.raises(ValueError, match="pages"):
        ix.refresh(ImageWriter(bytearray(5 * PAGE_SIZE)), [0])


def test_console_joins_source_and_target_and_finds_reboots(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.log", tmp_path / "dst.log"
    src.write_bytes(b"DWCP-T0 fill=0\nDWCP-HB 1\nDWCP-HB 2\nDWCP-CHECK 1 ok\nDWCP-HB 3\nDWCP-H")
    dst.write_bytes(b"B 4\nDWCP-HB 5\nDWCP-HB 6")  # the last line is still being written
    con = read_console([src, dst])
    assert con.heartbeats == (1, 2, 3, 4, 5) and con.checks == (1,) and con.boots == 1
    assert con.counter_gaps() == []
    src.write_bytes(b"DWCP-T0 fill=0\nDWCP-HB 1\nDWCP-HB 2\nDWCP-HB 3\n")
    dst.write_bytes(b"DWCP-T0 fill=0\nDWCP-HB 1\nDWCP-ERROR check 3 memory slot 2 differs\n")
    con = read_console([src, dst], [0, 0])
    assert con.counter_gaps() == [(3, 1)] and con.boots == 2 and len(con.errors) == 1


@given(st.integers(1, 300), st.lists(st.integers(0, 299), max_size=30), st.integers(0, 99),
       st.integers(1, 64), st.booleans())
def test_sent_digests_report_exactly_what_differs_from_the_copy(
        n: int, writes: list[int], seed: int, piece: int, from_bytes: bool) -> None:
    rng = random.Random(seed)
    live = _image(n, rng)
    shadow = ImageWriter(bytearray(n * PAGE_SIZE))
    if from_bytes:  # copied a piece at a time, digests from the bytes copied
        sent = SentDigests.blank(n)
        for first in range(0, n, piece):
            data = bytes(live.view(first, min(piece, n - first)))
            shadow.write(first, data)
            sent.read(first, data)
    else:
        shadow.write(0, live.view(0, n))
        sent = SentDigests(shadow)
    assert sent.changed(live) == []
    pages = sorted({w % n for w in writes})
    for p in pages:
        live.write(p, rng.randbytes(PAGE_SIZE))
    assert sent.changed(live) == pages
    half = pages[: len(pages) // 2]
    for p in half:
        shadow.write(p, live.view(p))
    sent.copied(shadow, half, {p: bytes(live.view(p)) for p in half} if from_bytes else None)
    assert sent.changed(live) == pages[len(pages) // 2 :]


def test_the_accelerator_probe_answers_tcg_without_kvm_and_keeps_its_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_probed", {})
    monkeypatch.setattr(accel.os, "access", lambda *_: False)
    assert accel.probe_accel("qemu", "/k", "/i", tmp_path) == "tcg"
    monkeypatch.undo()
    monkeypatch.setattr(accel, "_probed", {})
    if not Path("/dev/kvm").exists():
        return
    # with /dev/kvm: a file kept from an earlier probe answers without booting
    k, i = tmp_path / "k", tmp_path / "i"
    k.write_bytes(b"k")
    i.write_bytes(b"i")
    stamp = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in (k, i)]
    qemu = shutil.which("true") or "/bin/true"
    st = Path(qemu).stat()
    key = "\n".join([f"{qemu}:{st.st_size}:{st.st_mtime_ns}", *stamp])
    (tmp_path / f"accel-{hashlib.sha256(key.encode()).hexdigest()[:16]}").write_text("kvm\n")
    assert accel.probe_accel(qemu, str(k), str(i), tmp_path) == "kvm"
