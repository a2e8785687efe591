"""``make qemu-guest``: build the self-checking guest's kernel and initramfs.

The kernel is Debian's cloud kernel (``linux-image-cloud-amd64``) copied from ``/boot``;
the initramfs holds the static busybox (``busybox-static``), ``/init``
(:file:`init.sh`), the workload (:file:`selfcheck.sh`) and the virtio modules the disk
needs (the cloud kernel builds them as modules). ``guest.json`` records what went in.
Outputs appear by atomic rename, so an interrupted build leaves no half-written file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

__all__ = ["GuestAssets", "GuestAssetsMissing", "guest_dir", "load_assets", "guest_cmdline",
           "kernel_package", "static_busybox", "stage_initramfs", "pack_initramfs", "build"]

HERE = Path(__file__).resolve().parent
GUEST_FILES = ("init.sh", "selfcheck.sh")
#: The disk driver and what it needs, in load order (the kernel's modules.dep).
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk")
INFO = "guest.json"
KERNEL = "vmlinuz"
INITRD = "initramfs.cpio.gz"


class GuestAssetsMissing(Exception):
    """The guest's kernel or initramfs is not built, or a tool to build it is missing."""


def guest_dir() -> Path:
    """Where the guest's assets live: ``$DWCP_GUEST`` or ``~/.cache/dwcp-guest``."""
    env = os.environ.get("DWCP_GUEST")
    return Path(env) if env else Path.home() / ".cache" / "dwcp-guest"


@attrs.frozen
class GuestAssets:
    kernel: Path
    initrd: Path


def guest_cmdline(fill_percent: int = 0, disk: bool = False) -> str:
    """The kernel command line of the self-check workload: ``fill_percent`` of the guest's
    free memory in ballast (0: none), ``disk``: check ``/dev/vda`` too."""
    if not 0 <= fill_percent <= 90:
        raise ValueError(f"fill_percent: expected 0..90, got {fill_percent}")
    return (f"console=ttyS0 quiet panic=-1 dwcp.fill={fill_percent} "
            f"dwcp.disk={1 if disk else 0}")


def load_assets(root: Path | None = None) -> GuestAssets:
    """The built guest at ``root`` (default :func:`guest_dir`); raises
    :class:`GuestAssetsMissing` naming ``make qemu-guest``."""
    root = guest_dir() if root is None else root
    kernel, initrd = root / KERNEL, root / INITRD
    for path in (root / INFO, kernel, initrd):
        if not path.is_file():
            raise GuestAssetsMissing(f"{path}: the self-checking guest is not built "
                                     "(run `make qemu-guest`)")
    return GuestAssets(kernel, initrd)


def _run(argv: list[str], **kw: object) -> str:
    out = subprocess.run(argv, check=False, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if out.returncode != 0:
        raise GuestAssetsMissing(f"{' '.join(argv)}: exit {out.returncode}: "
                                 f"{out.stderr.strip()}")
    return str(out.stdout)


def kernel_package() -> tuple[str, str, Path]:
    """(package, version, vmlinuz) of the kernel ``linux-image-cloud-amd64`` depends on."""
    dep = _run(["dpkg-query", "-W", "-f=${Depends}", "linux-image-cloud-amd64"]).strip()
    pkg = dep.split()[0].rstrip(",")
    version = _run(["dpkg-query", "-W", "-f=${Version}", pkg]).strip()
    vmlinuz = Path("/boot") / ("vmlinuz-" + pkg.removeprefix("linux-image-"))
    if not vmlinuz.exists():
        raise GuestAssetsMissing(f"{vmlinuz}: missing although {pkg} is installed")
    return pkg, version, vmlinuz


def static_busybox() -> Path:
    """``/bin/busybox`` if it is the static build (``busybox-static``)."""
    busybox = Path("/bin/busybox")
    if not busybox.exists() or b"ld-linux" in busybox.read_bytes()[:4096]:
        # a dynamic binary names its loader (PT_INTERP) in the first page
        raise GuestAssetsMissing(f"{busybox} is not the static busybox "
                                 "(apt-get install busybox-static)")
    return busybox


def stage_initramfs(stage: Path, dirs: tuple[str, ...], files: dict[str, Path]) -> None:
    """A fresh tree at ``stage``: the static busybox in ``bin/``, directories ``dirs``, and
    ``files`` (path in the initramfs -> source), executable."""
    busybox = static_busybox()
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("bin", *dirs):
        (stage / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, stage / "bin" / "busybox")
    for name, src in files.items():
        target = stage / name
        shutil.copyfile(src, target)
        target.chmod(0o755)


def pack_initramfs(stage: Path, out: Path) -> None:
    """A gzip'd newc cpio of the tree ``stage`` (owner root, reproducible), written to
    ``out`` by atomic rename."""
    names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"], cwd=stage,
        input="\n".join(["."] + names).encode() + b"\n", capture_output=True, check=False)
    if cpio.returncode != 0:
        raise GuestAssetsMissing(f"cpio: exit {cpio.returncode}: {cpio.stderr.decode()}")
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        f.write(gzip.compress(cpio.stdout, compresslevel=6, mtime=0))
    os.replace(tmp, out)


def build(root: Path) -> GuestAssets:
    """Build (or rebuild) the guest's kernel and initramfs in ``root``."""
    for tool in ("cpio", "dpkg-query"):
        if shutil.which(tool) is None:
            raise GuestAssetsMissing(f"no `{tool}` (run `make qemu-guest`, it apt-get installs)")
    pkg, version, vmlinuz = kernel_package()
    modules = Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-")
    found = {p.name.removesuffix(".ko"): p for p in modules.rglob("*.ko")}
    missing = [m for m in MODULES if m not in found]
    if missing:
        raise GuestAssetsMissing(f"{modules}: no modules {missing} (uncompressed .ko)")
    root.mkdir(parents=True, exist_ok=True)
    stage = root / "initramfs.stage"
    files = {("init" if n == "init.sh" else n): HERE / n for n in GUEST_FILES}
    files.update({f"lib/modules/{m}.ko": found[m] for m in MODULES})
    stage_initramfs(stage, ("proc", "sys", "dev", "work", "lib/modules"), files)
    pack_initramfs(stage, root / INITRD)
    shutil.rmtree(stage)
    tmp = root / (KERNEL + ".part")
    shutil.copyfile(vmlinuz, tmp)
    os.replace(tmp, root / KERNEL)
    busybox_version = _run([str(static_busybox())]).splitlines()[0]
    info = {"kernel": {"package": pkg, "version": version, "file": KERNEL},
            "initramfs": INITRD, "busybox": busybox_version, "modules": list(MODULES)}
    tmp = root / (INFO + ".part")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, root / INFO)
    return load_assets(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m federation.demo.qemu_guest.build",
                                description=__doc__)
    p.add_argument("--dir", type=Path, default=None, help="output directory ($DWCP_GUEST)")
    args = p.parse_args(argv)
    try:
        assets = build(args.dir or guest_dir())
    except GuestAssetsMissing as e:
        print(f"qemu-guest: error: {e}", file=sys.stderr)
        return 1
    print(f"qemu-guest: kernel {assets.kernel}, initramfs {assets.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
