"""``dwcp bench at-rest``: what sealing images at rest costs the data plane.

The same v3 work is done twice on the same real VM state, once on plain image files
(``mmap``) and once on sealed ones (:mod:`federation.vms.sealing`: XChaCha20-Poly1305 per
64 KiB chunk), the way a node does it:

- ``store``: an import writes the image into the node's store (plain: a copy, fsynced;
  sealed: :func:`~federation.vms.sealed_image.seal_file`);
- ``index``: the source opens the stored image and builds its HDE index (every page
  fingerprinted, every 1 MiB block hashed), what each round and the root need;
- ``cold``: an HDE transfer (zstd level 3, in process, :mod:`mesh.hde.loopback`) into a
  target that holds nothing: a new image, written and published;
- ``warm``: the target holds the VM's older copy as a retained copy; it indexes that copy
  (its store) and the transfer writes the newer image over it, as a migration back does.

Each phase reports MB/s of image bytes by the wall clock and per CPU second of the
process (user + system, which a busy shared machine depresses less), plain and sealed
side by side, and ``sealed_cost``: sealed CPU seconds over plain ones.

The image: the corpus guest's RAM at t0 and t0+60 s when ``make corpus`` built it
(docs/CORPUS.md), else this process's own memory before and after a few hundred ms of
real work (as ``dwcp bench hde`` without the corpus), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from federation.vms.image_backend import map_writable
from federation.vms.sealed_image import SealedImage, SealedWriter, seal_file
from federation.vms.sealing import KEY_SIZE, SealKey
from mesh.hde.image import PAGE_SIZE, Image, ImageWriter, open_image
from mesh.hde.index import build_index
from mesh.hde.loopback import run_transfer
from mesh.hde.store import PageStore

#: zstd level of the transfers: the same for both modes (the comparison is about the
#: images at rest, not the level a link would pick).
LEVEL = 3
MODES = ("plain", "sealed")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(nbytes: int, fn: Callable[[], Any]) -> tuple[dict[str, float | None], Any]:
    wall, cpu = time.perf_counter(), _cpu()
    out = fn()
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    mb = nbytes / 1e6
    return {"s": round(wall, 4), "cpu_s": round(cpu, 4), "MBps": round(mb / wall, 1),
            "MB_per_cpu_s": round(mb / cpu, 1) if cpu > 0 else None}, out


def _store(src: Path, dst: Path, key: SealKey | None) -> None:
    if key is not None:
        seal_file(src, dst, key)
        return
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _open(path: Path, key: SealKey | None, name: str) -> Image:
    return SealedImage(path, key, name) if key is not None else open_image(path, name)


def _writable(path: Path, pages: int, key: SealKey | None, name: str) -> ImageWriter:
    if key is not None:
        return SealedWriter(path, key, pages, name)
    return map_writable(path, pages, name)


def _transfer(image: Image, sink: ImageWriter, store: PageStore, ex: Executor) -> None:
    ix = build_index(image, ex)
    r = run_transfer(image=image, index=ix, name="vm", store=store, level=LEVEL,
                     executor=ex, make_sink=lambda n: sink)
    if not r.verified:
        raise RuntimeError(f"HDE transfer did not verify: {r.failure}")
    sink.close()  # a sealed sink publishes here: part of the cost


def run_mode(mode: str, t0: Path, t1: Path, work: Path, ex: Executor) -> dict[str, Any]:
    key = SealKey(os.urandom(KEY_SIZE)) if mode == "sealed" else None
    d = work / mode
    d.mkdir()
    nbytes = t1.stat().st_size
    pages = nbytes // PAGE_SIZE
    out: dict[str, Any] = {}
    out["store"], _ = _timed(nbytes, lambda: _store(t1, d / "t1.img", key))
    _store(t0, d / "t0.img", key)  # the target's retained copy (not timed twice)
    src = _open(d / "t1.img", key, "t1")
    try:
        out["index"], _ = _timed(nbytes, lambda: build_index(src, ex))

        def cold() -> None:
            _transfer(src, _writable(d / "cold.img", pages, key, "cold"), PageStore(), ex)

        out["cold"], _ = _timed(nbytes, cold)

        def warm() -> None:
            sink = _writable(d / "t0.img", pages, key, "retained")
            store = PageStore()
            store.add("vm", sink, build_index(sink, ex))
            _transfer(src, sink, store, ex)

        out["warm"], _ = _timed(nbytes, warm)
    finally:
        src.close()
    with open(d / "t0.img", "rb") as a, open(t1, "rb") as b:  # the warm target holds t1 now
        if key is None and a.read() != b.read():
            raise RuntimeError("the warm transfer's image differs from the source")
    if key is not None:
        check = SealedImage(d / "t0.img", key, "check")
        try:
            if bytes(check.view(0, check.page_count)) != t1.read_bytes():
                raise RuntimeError("the warm transfer's sealed image differs from the source")
        finally:
            check.close()
    out["disk_bytes"] = {p.name: os.stat(p).st_blocks * 512 for p in sorted(d.glob("*.img"))}
    return out


def _images(work: Path, quick: bool) -> tuple[Path, Path, str]:
    """Two versions of one VM's RAM as files: the corpus' t0 and t0+60 s, or this
    process's memory before and after real work."""
    from federation.demo.corpus import ManifestError, load_manifest

    if not quick:
        try:
            manifest = load_manifest(check_sizes=False)
            for mib in (1024, 256):
                try:
                    t0, t1 = manifest.ram(mib, "A", 0), manifest.ram(mib, "A", 60)
                except ManifestError:
                    continue
                return (Path(t0), Path(t1),
                        f"corpus {manifest.root}: {mib} MiB guest, workload A RAM at t0 and "
                        "t0+60 s")
        except ManifestError:
            pass
    from bench.hde import MEMORY_CAP, WORK_S, build_fs_image, real_work
    from federation.demo.real_data import memory_regions, snapshot_memory

    dirs = sorted(str(p) for p in Path("/usr/lib").glob("python3*") if p.is_dir())
    fs_path, fs_what = build_fs_image(dirs, work, (4 << 20) if quick else (96 << 20))
    fs = open_image(fs_path, "fs")
    regions = memory_regions((16 << 20) if quick else MEMORY_CAP)
    snap0 = snapshot_memory(regions)
    real_work(fs, 0.05 if quick else WORK_S)
    snap1 = snapshot_memory(regions)
    fs.close()
    t0, t1 = work / "t0.raw", work / "t1.raw"
    t0.write_bytes(snap0)
    t1.write_bytes(snap1)
    return t0, t1, (f"no corpus: this process's own memory ({len(snap1) >> 20} MiB of "
                    f"readable mappings) before and after real work, holding a {fs_what}")


def run(quick: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-at-rest-") as tmp, \
            ThreadPoolExecutor(2) as ex:  # fmt: skip
        work = Path(tmp)
        t0, t1, what = _images(work, quick)
        out: dict[str, Any] = {"image": what, "image_bytes": t1.stat().st_size,
                               "zstd_level": LEVEL, "cores": os.cpu_count(),
                               "load_average": [round(x, 2) for x in os.getloadavg()]}
        for mode in MODES:
            out[mode] = run_mode(mode, t0, t1, work, ex)
        out["sealed_cost"] = {
            phase: round(out["sealed"][phase]["cpu_s"] / out["plain"][phase]["cpu_s"], 2)
            if out["plain"][phase]["cpu_s"] > 0 else None
            for phase in ("store", "index", "cold", "warm")}
    return out


def _main(args: argparse.Namespace) -> int:
    result = run(args.quick)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("at-rest", help="the data plane on sealed images against plain ones")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.add_argument("--quick", action="store_true", help="small corpus-free data (test smoke)")
    p.set_defaults(func=_main)
