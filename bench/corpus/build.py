"""``make corpus``: build the corpus of real VM state (docs/CORPUS.md).

Idempotent: a step whose output exists is skipped; outputs appear by atomic
rename, so an interrupted build leaves no half-written file behind.
``--small`` builds the quick 256 MiB development variant (t0, t0+6 s, t0+60 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.corpus import sources as src
from bench.corpus.guest import GuestSpec, RunningGuest
from federation.demo.corpus import MANIFEST_FORMAT, MANIFEST_NAME, corpus_dir

# Snapshot offsets from t0 in seconds of guest running time, as issue 6 asks.
MAIN_OFFSETS = (0, 6, 60, 600)
SMALL_OFFSETS = (0, 6, 60)
SIBLING_OFFSETS = (60,)
TOOLS = ("qemu-system-x86_64", "mke2fs", "e2fsck", "cpio", "dpkg-deb", "apt-get", "mount")


def step(msg: str) -> None:
    print(f"corpus: {datetime.now(UTC):%H:%M:%S} {msg}", flush=True)


def ram_dir() -> Path:
    """Where the guest's RAM file lives while it runs: tmpfs, never a disk.

    Measured: with the RAM file on the disk, the kernel's writeback of the guest's
    dirty pages stalled QMP ``stop`` for 12 s and a 1 GiB snapshot copy for 97 s.
    """
    shm = Path("/dev/shm")
    path = shm / f"dwcp-corpus-{os.getuid()}" if shm.is_dir() else corpus_dir() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ram_name(mib: int, workload: str, offset: int) -> str:
    return f"ram/{mib}m-{workload}-t{offset}.raw"


def boot_and_snapshot(root: Path, spec: GuestSpec, offsets: tuple[int, ...]) -> None:
    """Boot one guest and snapshot its RAM at each offset; skip if all exist."""
    outs = [root / ram_name(spec.mib, spec.workload, o) for o in offsets]
    record_path = root / f"ram/{spec.mib}m-{spec.workload}.json"
    if all(p.exists() for p in outs) and record_path.exists():
        step(f"ram {spec.mib} MiB workload {spec.workload}: snapshots exist, skipped")
        return
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    mem = ram_dir() / f"mem-{spec.mib}m-{spec.workload}"
    mem.unlink(missing_ok=True)
    log = root / f"ram/{spec.mib}m-{spec.workload}-serial.log"
    log.unlink(missing_ok=True)
    step(f"ram {spec.mib} MiB workload {spec.workload}: booting under TCG, offsets {offsets}")
    records = []
    with RunningGuest(spec, run_dir, mem, log) as guest:
        guest.wait_t0()
        step(f"ram {spec.mib} MiB workload {spec.workload}: t0 (DWCP-T0 on the serial console)")
        for offset, out in zip(offsets, outs, strict=True):
            guest.wait_running(offset)
            rec = guest.snapshot(mem, out)
            rec.update(offset_s=offset, path=str(out.relative_to(root)))
            records.append(rec)
            step(
                f"ram {spec.mib} MiB workload {spec.workload}: snapshot t0+{offset} s taken at "
                f"{rec['guest_running_s_since_t0']} s, paused {rec['pause_s']} s, "
                f"{rec['iterations_done']} iterations done"
            )
    mem.unlink()
    record = {"guest": {"mib": spec.mib, "workload": spec.workload, "cmdline": spec.cmdline()},
              "snapshots": records}  # fmt: skip
    record_path.write_text(json.dumps(record, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def describe(rel: str, info: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(kind, what, meta) of a corpus file from its path."""
    name = Path(rel).name
    if rel.startswith("ram/") and name.endswith(".raw"):
        size, workload, t = name.removesuffix(".raw").split("-")
        mib, offset = int(size.removesuffix("m")), int(t.removeprefix("t"))
        what = (f"guest RAM, {mib} MiB guest, workload {workload}, at t0+{offset} s "
                "(guest running time)")  # fmt: skip
        return "ram", what, {"guest_mib": mib, "workload": workload, "offset_s": offset}
    if rel.startswith("ram/") and name.endswith("-serial.log"):
        return "log", "serial console of the guest run that took these snapshots", {}
    if rel.startswith("ram/") and name.endswith(".json"):
        return "record", "snapshot times and pauses of one guest run", {}
    if rel.startswith("disk/"):
        version = name.removesuffix(".ext4")
        pkgs = {p: v[0 if version == "v1" else 1] for p, v in info["packages"].items()}
        what = ("ext4 image, mke2fs -d of the old package versions" if version == "v1" else
                "the v1 image, loop-mounted, with the newer package versions unpacked over it")
        return "disk", what, {"version": version, "packages": pkgs}
    if rel.startswith("kernel/"):
        return "kernel", f"{info['kernel']['package']} {info['kernel']['version']}", {}
    if rel.startswith("initramfs/"):
        return "initramfs", "busybox initramfs: /init, workloads A and B, /data", {}
    if rel.startswith("debs/"):
        return "deb", "Debian package the data set and disks are unpacked from", {}
    raise ValueError(f"{rel}: not a corpus file")


def write_manifest(root: Path, info: dict[str, Any]) -> None:
    """List every corpus file; reuse a digest when size and mtime did not change."""
    old: dict[str, dict[str, Any]] = {}
    if (root / MANIFEST_NAME).exists():
        old = {f["path"]: f for f in json.loads((root / MANIFEST_NAME).read_text())["files"]}
    files = []
    for sub in ("kernel", "initramfs", "debs", "disk", "ram"):
        for path in sorted((root / sub).glob("*")):
            if path.name.endswith(".part") or not path.is_file():
                continue
            rel = str(path.relative_to(root))
            st = path.stat()
            prev = old.get(rel)
            if prev and prev["size"] == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns:
                digest = prev["sha256"]
            else:
                step(f"manifest: sha256 {rel}")
                digest = sha256_file(path)
            kind, what, meta = describe(rel, info)
            files.append({"path": rel, "size": st.st_size, "sha256": digest, "kind": kind,
                          "what": what, "meta": meta, "mtime_ns": st.st_mtime_ns})  # fmt: skip
    doc = {"format": MANIFEST_FORMAT, "info": info, "files": files}
    tmp = root / (MANIFEST_NAME + ".part")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(root / MANIFEST_NAME)
    step(f"manifest: {len(files)} files in {root / MANIFEST_NAME}")


def build(root: Path, small: bool) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise src.SourceError(f"missing tools {missing}: run `make corpus` (it apt-get installs)")
    root.mkdir(parents=True, exist_ok=True)
    step(f"corpus directory {root}")
    picked = src.pick_versions()
    debs_old, debs_new = [], []
    for pkg, (old, new) in picked.items():
        step(f"deb {pkg}: {old} (v1) and {new} (v2)")
        debs_old.append(src.download(pkg, old, root / "debs"))
        debs_new.append(src.download(pkg, new, root / "debs"))
    kpkg, kver, vmlinuz = src.kernel_package()
    kernel = root / "kernel" / vmlinuz.name
    if not kernel.exists():
        kernel.parent.mkdir(exist_ok=True)
        shutil.copyfile(vmlinuz, kernel)
    step(f"kernel {kpkg} {kver}: {kernel}")
    initramfs = root / "initramfs" / "dwcp-initramfs.cpio.gz"
    if initramfs.exists():
        step(f"initramfs exists, skipped: {initramfs}")
    else:
        initramfs.parent.mkdir(exist_ok=True)
        step("initramfs: static busybox, init, workloads, /data from the v1 packages")
        src.build_initramfs(debs_old, initramfs, root / "run")
    (root / "disk").mkdir(exist_ok=True)
    v1, v2 = root / "disk" / "v1.ext4", root / "disk" / "v2.ext4"
    if v1.exists():
        step("disk v1 exists, skipped")
    else:
        step(f"disk v1: mke2fs -d, {src.DISK_MIB} MiB ext4")
        src.build_disk_v1(debs_old, v1, root / "run")
    if v2.exists():
        step("disk v2 exists, skipped")
    else:
        step("disk v2: v1 + newer packages unpacked over it (loop mount)")
        src.build_disk_v2(v1, debs_new, v2, root / "run")
    (root / "ram").mkdir(exist_ok=True)
    mib = 256 if small else 1024
    offsets = SMALL_OFFSETS if small else MAIN_OFFSETS
    boot_and_snapshot(root, GuestSpec(kernel, initramfs, mib, "A"), offsets)
    boot_and_snapshot(root, GuestSpec(kernel, initramfs, mib, "B"), SIBLING_OFFSETS)
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    busybox = subprocess.run(["/bin/busybox"], capture_output=True, text=True).stdout
    info = {
        "packages": {p: list(v) for p, v in picked.items()},
        "kernel": {"package": kpkg, "version": kver, "file": str(kernel.relative_to(root))},
        "qemu": qemu.stdout.splitlines()[0],
        "busybox": busybox.splitlines()[0] if busybox else "unknown",
        "initramfs": str(initramfs.relative_to(root)),
        "built_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_manifest(root, info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpus.build", description=__doc__)
    p.add_argument("--small", action="store_true", help="256 MiB guest, offsets up to 60 s")
    p.add_argument("--dir", type=Path, default=None, help="corpus directory ($DWCP_CORPUS)")
    args = p.parse_args(argv)
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the guest's QEMU is shut down by its ``with``.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        build(args.dir or corpus_dir(), args.small)
    except Exception as e:  # noqa: BLE001 - one readable line for make, not a traceback
        print(f"corpus: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    step(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
