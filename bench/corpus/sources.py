"""The corpus's inputs: Debian packages, the kernel, the guest initramfs, ext4 images.

Everything comes from the Debian archive by name (``apt-get download``), so the
corpus is real files, never random bytes, and is described exactly by package
versions (docs/CORPUS.md).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from federation.demo.qemu_guest import build as guest_build

# The data set: the Python 3.11 standard library, Perl's core modules and the time
# zone database. Each has a newer version in bookworm-security/-updates than in
# bookworm, so "the disk after an upgrade" is a real upgrade (docs/CORPUS.md).
PACKAGES = ("libpython3.11-stdlib", "libpython3.11-minimal", "perl-modules-5.36", "tzdata")
# The disk image size: the unpacked data set is 33 MB; the rest is free space
# as on a real root disk.
DISK_MIB = 128
HERE = Path(__file__).resolve().parent
GUEST_FILES = ("init.sh", "workload_A.sh", "workload_B.sh")


class SourceError(Exception):
    """A tool or a package the corpus needs is not there."""


def run(argv: list[str], **kw: object) -> str:
    out = subprocess.run(argv, check=False, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if out.returncode != 0:
        raise SourceError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.strip()}")
    return str(out.stdout)


def versions(package: str) -> list[str]:
    """Versions of ``package`` the apt sources offer, oldest first."""
    rows = run(["apt-cache", "madison", package]).splitlines()
    found = sorted({r.split("|")[1].strip() for r in rows if r.count("|") >= 2}, key=_vkey)
    if not found:
        raise SourceError(f"apt-cache madison {package}: no versions (run apt-get update)")
    return found


def _vkey(version: str) -> Any:
    def cmp(a: str, b: str) -> int:
        if a == b:
            return 0
        lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode
        return -1 if lt == 0 else 1

    return functools.cmp_to_key(cmp)(version)


def pick_versions() -> dict[str, tuple[str, str]]:
    """For each package: (old, new) = the two newest versions apt offers."""
    picked = {}
    for p in PACKAGES:
        v = versions(p)
        if len(v) < 2:
            raise SourceError(f"{p}: only version {v[0]} available; the disk needs two")
        picked[p] = (v[-2], v[-1])
    return picked


def download(package: str, version: str, debs: Path) -> Path:
    """``apt-get download package=version`` into ``debs`` unless it is already there."""
    debs.mkdir(parents=True, exist_ok=True)
    have = [p for p in debs.glob(f"{package}_*.deb") if _deb_version(p) == version]
    if have:
        return have[0]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        os.chmod(tmp, 0o777)  # apt drops to user _apt for downloads
        run(["apt-get", "download", f"{package}={version}"], cwd=tmp)
        (got,) = Path(tmp).glob("*.deb")
        return Path(shutil.move(got, debs / got.name))


def _deb_version(deb: Path) -> str:
    return run(["dpkg-deb", "-f", str(deb), "Version"]).strip()


def unpack(debs: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(dest)])


def kernel_package() -> tuple[str, str, Path]:
    """(package, version, vmlinuz) of the kernel linux-image-cloud-amd64 depends on."""
    try:
        return guest_build.kernel_package()
    except guest_build.GuestAssetsMissing as e:
        raise SourceError(str(e)) from None


def build_initramfs(data_debs: list[Path], out: Path, work: Path) -> None:
    """A newc cpio (gzip) with static busybox, /init, the workloads and /data."""
    stage = work / "initramfs"
    files = {("init" if n == "init.sh" else n): HERE / n for n in GUEST_FILES}
    try:
        guest_build.stage_initramfs(stage, ("proc", "sys", "dev", "work", "tmp"), files)
    except guest_build.GuestAssetsMissing as e:
        raise SourceError(str(e)) from None
    unpack(data_debs, stage / "data")
    try:
        guest_build.pack_initramfs(stage, out)
    except guest_build.GuestAssetsMissing as e:
        raise SourceError(str(e)) from None
    shutil.rmtree(stage)


def build_disk_v1(debs: list[Path], out: Path, work: Path) -> None:
    """ext4 from the unpacked old packages (``mke2fs -d``), fixed UUID and hash seed.

    4 KiB blocks as on a real root disk (mke2fs picks 1 KiB for a "small" 128 MiB
    file system), so file blocks line up with HDE's 4 KiB pages.
    """
    tree = work / "disk-v1-tree"
    shutil.rmtree(tree, ignore_errors=True)
    unpack(debs, tree)
    tmp = out.with_name(out.name + ".part")
    tmp.unlink(missing_ok=True)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}  # reproducible timestamps
    run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "dwcp-corpus", "-d", str(tree),
         "-U", "d3c0ffee-0000-4000-8000-000000000001",
         "-E", "root_owner=0:0,hash_seed=d3c0ffee-0000-4000-8000-000000000002",
         str(tmp), f"{DISK_MIB}M"],
        env=env,
    )  # fmt: skip
    os.replace(tmp, out)
    shutil.rmtree(tree)


def build_disk_v2(v1: Path, new_debs: list[Path], out: Path, work: Path) -> None:
    """A copy of v1, loop-mounted, with the newer packages unpacked over it (an upgrade)."""
    tmp = out.with_name(out.name + ".part")
    shutil.copyfile(v1, tmp)
    mnt = work / "disk-v2-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    run(["mount", "-o", "loop", str(tmp), str(mnt)])
    try:
        unpack(new_debs, mnt)
    finally:
        run(["umount", str(mnt)])
    run(["e2fsck", "-fn", str(tmp)])
    os.replace(tmp, out)
