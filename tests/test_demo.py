"""``dwcp demo`` (what ``make demo`` runs) and the real data its VM is made of."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from federation.demo import vm_data as demo_data
from federation.demo.corpus import ManifestError, load_manifest
from federation.demo.processes import DemoFailed, NodeProcess
from federation.demo.scenario import Demo
from federation.demo.vm_data import PAGE, SMALL_RAM_MIB, build_vm_data

#: The summary lines the demo must print, each with its figure (issue 7, item 5).
SUMMARY = [
    r"data plane \(as dc1 reports it\): \S",
    r"dc1 imported demo-vm: \d+ pages .* writer dirtying \d+ pages/s",
    r"rounds: +\d+ ",
    r"bytes: +[\d.]+ \w+ logical, [\d.]+ \w+ on the wire",
    r"downtime: +[\d.]+ m?s \(fence at dc1 to start at dc3",
    r"total time: +[\d.]+ m?s",
    r"protocol: +transfer version v\d+ \(link dc1-dc3 negotiated v\d+\); data plane: \S",
    r"image hash: +memory\.img sha256 [0-9a-f]{16}\.\.\. at dc3 == dc1's at the fence",
    r"image hash: +disk-0\.img sha256 [0-9a-f]{16}\.\.\. at dc3 == dc1's at the fence",
    r"writer check: +\d+ pages the writer last wrote before the fence are intact at dc3",
    r"ledgers: +all 4 agree: owner dc3, epoch \d+, migration committed",
    r"dc1: link down \d+ ms, suspect [\d.]+ m?s, dead [\d.]+ m?s, rerouted [\d.]+ m?s",
    r"dc1's bulk routes now: dc2: none \(dead\), dc3: (direct|via dc4), dc4: (direct|via dc3)",
    r"every survivor holds dc2 dead and routes around it within",
    r"exit status: dc1 0, dc3 0, dc4 0",
    r"OK: every check passed",
]


@pytest.mark.processes
def test_demo_small_migrates_and_every_check_holds() -> None:
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "federation", "demo", "--small"],
                          capture_output=True, text=True, timeout=110)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-2000:]}"
    for pattern in SUMMARY:
        assert re.search(pattern, out), f"missing /{pattern}/ in:\n{out}"
    assert "FAILED" not in out
    assert time.monotonic() - began < 110


def test_demo_refuses_a_writer_rate_that_is_not_positive() -> None:
    proc = subprocess.run([sys.executable, "-m", "federation", "demo", "--writer-rate", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--writer-rate must be positive" in proc.stderr


def _ext4_magic(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(1024 + 0x38)  # the superblock's s_magic
        return f.read(2)


def test_without_a_corpus_the_vm_is_process_memory_and_an_ext4_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_CORPUS", str(tmp_path / "no-corpus"))
    if demo_data.shutil.which("mke2fs") is None and not Path("/usr/sbin/mke2fs").exists():
        pytest.skip("needs mke2fs (e2fsprogs) to build the ext4 image")
    data = build_vm_data(tmp_path / "vm", "small")
    size = data.memory.stat().st_size
    assert size > 0 and size % PAGE == 0
    assert b"\x7fELF" in data.memory.read_bytes()  # mapped executables and libraries
    assert "/proc/self/mem" in data.sources[0]
    (disk,) = data.disks
    assert disk.stat().st_size % PAGE == 0
    assert _ext4_magic(disk) == b"\x53\xef"


def test_without_mke2fs_the_disk_is_a_tar_of_a_real_tree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_CORPUS", str(tmp_path / "no-corpus"))
    monkeypatch.setattr(demo_data.shutil, "which", lambda *_: None)
    disk, what = demo_data._real_disk(tmp_path)
    assert disk.name == "disk.tar" and disk.stat().st_size % PAGE == 0
    assert "tar of" in what
    with tarfile.open(disk) as tar:
        names = tar.getnames()
    assert any(n.endswith("__init__.py") for n in names)


def test_small_corpus_memory_is_a_prefix_of_the_guest_ram(tmp_path: Path) -> None:
    try:
        manifest = load_manifest()
        ram = manifest.ram(256, "A", 60)
    except ManifestError as exc:
        pytest.skip(f"needs the corpus (make corpus-small): {exc}")
    data = build_vm_data(tmp_path, "small")
    mem = data.memory.read_bytes()
    assert len(mem) == SMALL_RAM_MIB << 20
    with ram.open("rb") as f:
        assert hashlib.sha256(f.read(len(mem))).digest() == hashlib.sha256(mem).digest()
    assert "trimmed for --small" in data.sources[0]


def _fake_federation(root: Path) -> SimpleNamespace:
    return SimpleNamespace(config_path=root / "federation.toml", nodes={},
                           federation=SimpleNamespace(dcs=[]))


def _vm_copy(root: Path, dc: str, memory: bytes, log: str = "") -> Path:
    d = root / "data" / dc / "vms" / "vm"
    d.mkdir(parents=True)
    (d / "memory.img").write_bytes(memory)
    (d / "writer.log").write_text(log)
    return d


def test_the_image_check_fails_on_a_differing_copy_or_a_lost_write(tmp_path: Path) -> None:
    page = Path(sys.executable).read_bytes()[:2 * PAGE]  # real bytes: the interpreter
    sha = hashlib.sha256(page[PAGE:]).hexdigest()
    log = json.dumps({"seq": 1, "image": "memory", "page": 1, "offset": 0,
                      "data": "", "sha256": sha}) + "\n"
    demo = Demo(_fake_federation(tmp_path), tmp_path, DemoFailed)  # type: ignore[arg-type]
    _vm_copy(tmp_path, "dc1", page, log)
    dst = _vm_copy(tmp_path, "dc3", page)
    hashes, writes = demo.check_images("vm", "dc1", "dc3")
    assert hashes == {"memory.img": hashlib.sha256(page).hexdigest()} and writes == 1
    (dst / "memory.img").write_bytes(page[:PAGE] + bytes(PAGE))
    with pytest.raises(DemoFailed, match="memory.img: dc3's sha256"):
        demo.check_images("vm", "dc1", "dc3")
    (tmp_path / "data" / "dc1" / "vms" / "vm" / "memory.img").write_bytes(
        page[:PAGE] + bytes(PAGE))
    with pytest.raises(DemoFailed, match="differs from what the writer wrote"):
        demo.check_images("vm", "dc1", "dc3")


def test_a_replaced_link_counts_the_kept_connections_dialler() -> None:
    """Seen in `make demo` (2026-12-07): dc2 took dc4's dial, then the tie-break replaced
    it by dc2's own (`link_replaced`, no new `peer_up`), while dc4 kept dc2's dial from the
    start. Both ends kept dc2's connection; the demo must see them agree."""
    dc2, dc4 = NodeProcess("dc2", Path("unused")), NodeProcess("dc4", Path("unused"))

    async def feed() -> None:  # the log reader stamps each record with trio's clock
        for line in (
            '{"event":"peer_up","peer":"dc4","version":3,"initiator":"dc4","link":2}',
            '{"event":"link_replaced","peer":"dc4","kept":3,"closed":2,"initiator":"dc2"}',
        ):
            dc2._on_line(line)
        for line in (
            '{"event":"peer_up","peer":"dc2","version":3,"initiator":"dc2","link":2}',
            '{"event":"link_duplicate","peer":"dc2","kept":2,"closed":3}',
        ):
            dc4._on_line(line)

    trio.run(feed)
    assert dc2.initiators["dc4"] == dc4.initiators["dc2"] == "dc2"
