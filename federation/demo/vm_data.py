"""The VM ``dwcp demo`` migrates, made from real data only (never random bytes).

In order of preference:

- the corpus (docs/CORPUS.md, ``$DWCP_CORPUS``): a RAM snapshot of a running Linux
  guest and its ext4 disk;
- else this process's own memory pages (``/proc/self/mem``) and a filesystem image
  that ``mke2fs -d`` builds from a real directory (the Python standard library);
- else, without ``mke2fs``, a tar archive of that directory tree as the disk.

Images are whole 4 KiB pages (what :class:`federation.vms.image_backend.ImageBackend` takes).
A trimmed image is a prefix of the real file; a tar is padded with zeros to a page,
as tar pads itself to its record size.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sysconfig
import tarfile
from pathlib import Path

import attrs

from federation.demo.corpus import ManifestError, load_manifest
from federation.demo.real_data import write_process_memory

__all__ = ["VmData", "build_vm_data", "PAGE", "SIZES"]

PAGE = 4096
_MIB = 1 << 20
#: The corpus guests (docs/CORPUS.md): RAM 60 s after boot under workload A, when the
#: guest's page cache is warm.
FULL_GUEST_MIB, SMALL_GUEST_MIB = 1024, 256
#: The default demo moves the 256 MiB guest: with the v1 data plane the 1 GiB guest's
#: first round alone took 68 s on this 2-core machine at load 9 (measured with
#: ``dwcp demo --full``), over the issue's 2 minutes for the whole demo.
DEFAULT_GUEST_MIB = SMALL_GUEST_MIB
#: ``--small`` trims guest RAM to this prefix: 64 MiB moves in a few seconds on a
#: loaded 2-core machine, which keeps ``tests/test_demo.py`` inside its 60 s budget.
SMALL_RAM_MIB = 64
SIZES = ("small", "default", "full")
#: Process memory read for the fallback guest RAM (the interpreter maps ~30-60 MiB).
PROCESS_RAM_MIB = 48
#: Extra room in a built ext4 image over the directory's size (inodes, journal).
_EXT4_SLACK = 1.6


@attrs.frozen
class VmData:
    memory: Path
    disks: tuple[Path, ...]
    #: one human line per image: where its bytes come from
    sources: tuple[str, ...]


def _copy_prefix(src: Path, dst: Path, nbytes: int) -> Path:
    """The first ``nbytes`` of ``src`` (rounded down to a page) into ``dst``."""
    nbytes = min(nbytes, src.stat().st_size) // PAGE * PAGE
    with src.open("rb") as fin, dst.open("wb") as fout:
        left = nbytes
        while left:
            chunk = fin.read(min(left, 8 * _MIB))
            if not chunk:
                break
            fout.write(chunk)
            left -= len(chunk)
    return dst


def _corpus(directory: Path, size: str) -> VmData | None:
    try:
        manifest = load_manifest()
        disk = manifest.path(manifest.one("disk", version="v1"))
    except ManifestError:
        return None
    want = FULL_GUEST_MIB if size == "full" else DEFAULT_GUEST_MIB
    rams = {}
    for mib in (FULL_GUEST_MIB, SMALL_GUEST_MIB):
        try:
            rams[mib] = manifest.ram(mib, "A", 60)
        except ManifestError:
            continue
    if not rams:
        return None
    mib = want if want in rams else next(iter(rams))
    ram = rams[mib]
    if size == "small":
        memory = _copy_prefix(ram, directory / "memory.img", SMALL_RAM_MIB * _MIB)
        disk_img, disk_what = _real_disk(directory)
        return VmData(memory, (disk_img,), (
            f"memory: first {SMALL_RAM_MIB} MiB of the corpus guest RAM {ram} "
            f"({mib} MiB guest, trimmed for --small)", disk_what))
    disk_what = f"disk-0: corpus ext4 disk {disk}, {disk.stat().st_size // _MIB} MiB"
    if mib > want:  # only the big guest is there: its prefix, as big as the one wanted
        memory = _copy_prefix(ram, directory / "memory.img", want * _MIB)
        return VmData(memory, (disk,), (
            f"memory: first {want} MiB of the corpus guest RAM {ram} (trimmed: the "
            f"{want} MiB guest is not in the corpus; `make corpus-small` adds it)", disk_what))
    note = ("" if mib == want else f" (the {want} MiB guest is not in the corpus)")
    if size == "default" and mib == DEFAULT_GUEST_MIB and FULL_GUEST_MIB in rams:
        note = f" (`dwcp demo --full` moves the {FULL_GUEST_MIB} MiB guest instead)"
    return VmData(ram, (disk,), (f"memory: corpus guest RAM {ram}, {mib} MiB{note}",
                                 disk_what))


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return total


def _real_disk(directory: Path) -> tuple[Path, str]:
    """An ext4 image of a real directory (mke2fs -d), else a tar of it."""
    source = Path(sysconfig.get_paths()["stdlib"]) / "json"
    if not source.is_dir():
        source = Path(__file__).resolve().parent
    mke2fs = shutil.which("mke2fs") or shutil.which("/usr/sbin/mke2fs")
    if mke2fs is not None:
        mib = max(8, int(_tree_bytes(source) * _EXT4_SLACK) // _MIB + 4)
        path = directory / "disk.ext4"
        subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", str(source), str(path),
                        f"{mib}M"], check=True, capture_output=True)
        return path, f"disk-0: {mib} MiB ext4 built by mke2fs -d from {source}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(source), arcname=source.name)
    data = buf.getvalue()
    data += b"\0" * (-len(data) % PAGE)
    path = directory / "disk.tar"
    path.write_bytes(data)
    return path, (f"disk-0: tar of {source} ({len(data) // 1024} KiB; mke2fs is not "
                  "installed, so no filesystem image)")


def build_vm_data(directory: Path, size: str) -> VmData:
    """The demo VM's images (``size`` one of :data:`SIZES`) in ``directory``; corpus files
    are used in place."""
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    directory.mkdir(parents=True, exist_ok=True)
    found = _corpus(directory, size)
    if found is not None:
        return found
    memory = write_process_memory(directory / "memory.img", PROCESS_RAM_MIB * _MIB)
    disk, disk_what = _real_disk(directory)
    return VmData(memory, (disk,), (
        f"memory: {memory.stat().st_size // _MIB} MiB of the demo process's own memory "
        "(/proc/self/mem; no corpus, see docs/CORPUS.md)", disk_what))
