"""``dwcp bench hde``: what HDE puts on the wire for real VM state, and how fast it encodes.

With the corpus (``make corpus``, docs/CORPUS.md) the image is the guest RAM of
workload A at t0+60 s (1 GiB guest, or the 256 MiB ``--small`` build); QEMU's
own multifd+zstd migration of that snapshot is the baseline; the sibling
case puts workload B's RAM in the target's store; the warm case puts t0 there.

Without the corpus the RAM image is this process's own memory: every readable
mapping in ``/proc/self/maps``, read through ``/proc/self/mem``, with the
process holding a real filesystem image (an ext4 image ``mke2fs -d`` builds
from ``/usr/lib/python3*``, or a tar of it when mke2fs is missing). The
process then does real work (compressing and checksumming that image,
building and sorting lists) for a few hundred ms and reads the same mappings
again: that pair stands in for the warm case, clearly labelled. Figures that
need the corpus or QEMU are null, and ``missing`` says why.

``cold_wire_bytes`` counts every byte both directions of the transfer would put
on the wire (diff messages and chunk frames) into an empty target, at the zstd
level chosen for a 100 Mbit/s internet link from speeds measured on the image (per
CPU second of the measuring thread: ``LEVEL_CLOCK``).
The warm transfer's level is chosen the same way, for the same link, from the pages it
sends (XORed against t0 where the encoder would), as a migration chooses its level from
the pages of its first round; the sibling transfer uses the cold transfer's level.
``encode_MBps_*`` time the source's whole job for a cold transfer — index,
plan, encode every chunk — at the level chosen for a 10 Gbit/s datacenter link and 2
cores, the picker counting the index and plan CPU every level pays besides compression
(``encode_fixed_ns_per_byte``); one core runs at the same level, and zstd -5 and 1 are
timed on both (``encode_MBps_2cores_at_zstd1``: level 1); ``encode_MB_per_cpu_s``
divides by the CPU time used, which a busy shared machine does not depress. Each has a
``*_nonzero`` twin over the image's non-zero pages only: a zero page costs a
fingerprint and no encoding, so logical MB/s on a mostly-zero guest says little about
the work (issue 17 item 6). ``*_at_zstd1`` byte figures are the same transfers at zstd
level 1, QEMU's multifd default: the protocol's gain (dedup, zero pages, deltas) apart
from the chosen level's compression gain.

``fuller_guest`` (skip with ``--no-fuller``) repeats the encode and cold figures on the
fuller workload (:mod:`bench.corpus.fuller`): the self-checking guest of ``make
qemu-guest`` booted with most of its free memory in ballast, under 30 % zero pages.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zstandard

from federation.demo.corpus import ManifestError, load_manifest
from federation.demo.real_data import memory_regions, snapshot_memory
from mesh.hde.codec import ChunkPlan, delta_body, encode_chunk
from mesh.hde.image import FP_SIZE, PAGE_SIZE, UNIFORM_FP, Image, PageSource, open_image
from mesh.hde.index import PageIndex, build_index
from mesh.hde.level import choose_level, measure_levels
from mesh.hde.loopback import run_transfer
from mesh.hde.messages import CHUNK_PAGES
from mesh.hde.store import PageStore

#: The links the issue names: 100 Mbit/s for the cold figure; a datacenter link for the
#: encode speed (DESIGN.md: datacenter means >= 1 Gbit/s; 10 GbE is the common DC port).
COLD_LINK_BPS = 100e6 / 8
DC_LINK_BPS = 10e9 / 8
#: Chunks compressed per level when calibrating (8 MiB): enough to be stable to a few %.
SAMPLE_CHUNKS = 8
#: The clock the 100 Mbit/s levels are measured with: this thread's CPU time, so the byte
#: figures say what two uncontended cores would choose, not how busy the machine was (on
#: the shared build machine, wall-clock speeds halved under load and the warm level swung
#: between 12 and 16 from run to run). A node measures with the wall clock
#: (federation.dataplane.v3_protocol.choose_chunk_level): there the CPU it actually gets
#: is what counts.
LEVEL_CLOCK = time.thread_time
#: How long the process works between its two memory snapshots ("a few hundred ms").
WORK_S = 0.3
#: Cap on the process-memory image: this process maps ~150-300 MiB.
MEMORY_CAP = 512 << 20


# --------------------------------------------------------------------------- data


def build_fs_image(src_dirs: list[str], workdir: Path, limit: int) -> tuple[Path, str]:
    """A filesystem image of real files: ext4 by ``mke2fs -d`` if present, else a tar."""
    tree = workdir / "tree"
    tree.mkdir()
    size = 0
    for d in src_dirs:
        for dirpath, _, files in os.walk(d):
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                if not os.path.isfile(p) or os.path.islink(p) or size >= limit:
                    continue
                dst = tree / os.path.relpath(p, "/")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
                size += os.path.getsize(p)
    out = workdir / "fs.img"
    mke2fs = shutil.which("mke2fs") or ("/usr/sbin/mke2fs" if os.path.exists("/usr/sbin/mke2fs")
                                        else None)  # fmt: skip
    if mke2fs:
        mib = max(8, int(size * 1.4) >> 20)
        subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", str(tree), str(out), f"{mib}M"],
                       check=True, capture_output=True)  # fmt: skip
        what = f"ext4 image (mke2fs -d) of {size >> 20} MiB of files from {', '.join(src_dirs)}"
    else:
        bio = io.BytesIO()
        with tarfile.open(fileobj=bio, mode="w") as tf:
            tf.add(tree, arcname=".")
        data = bio.getvalue()
        out.write_bytes(data + bytes(-len(data) % PAGE_SIZE))
        what = f"tar of {size >> 20} MiB of files from {', '.join(src_dirs)} (no mke2fs)"
    shutil.rmtree(tree)
    return out, what


def real_work(data: PageSource, seconds: float) -> dict[str, Any]:
    """Compress and checksum the filesystem image, build and sort lists, for ``seconds``."""
    start = time.perf_counter()
    rounds = 0
    kept: list[list[tuple[bytes, int]]] = []
    while time.perf_counter() - start < seconds:
        p = (rounds * 97) % max(1, data.page_count - 64)
        block = bytes(data.view(p, min(64, data.page_count - p)))
        packed = zstandard.ZstdCompressor(level=3).compress(block)
        digest = hashlib.sha256(packed).digest()
        kept.append(sorted((digest[i : i + 4], i) for i in range(0, 32, 2)))
        rounds += 1
    return {"interval_s": round(time.perf_counter() - start, 3), "work_rounds": rounds,
            "work_kept": len(kept)}  # fmt: skip


# --------------------------------------------------------------------------- measures


def cold_plan(index: PageIndex) -> list[ChunkPlan]:
    """The chunks an empty target asks for: each distinct non-uniform page, once (at its
    first position). Built with dict and zip in C, not a Python loop per page: on the
    fuller guest (65,536 pages) the loop took 0.107 CPU s of the 0.41 s the whole encode
    job took at level 0, serially, on the thread that feeds the encoders."""
    fps = bytes(index.fps)  # slices of bytes: 2.5x faster than bytes() of memoryview slices
    keys = [fps[i : i + FP_SIZE] for i in range(0, len(fps), FP_SIZE)]
    # reversed: for a fingerprint seen more than once, the first position is stored last
    first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1), strict=True))
    for fp in UNIFORM_FP:
        first.pop(fp, None)
    wanted = sorted(first.values())
    return [ChunkPlan.of_pages(i // CHUNK_PAGES, wanted[i : i + CHUNK_PAGES])
            for i in range(0, len(wanted), CHUNK_PAGES)]  # fmt: skip


def warm_plan(index: PageIndex, base: PageIndex) -> list[ChunkPlan]:
    """The chunks a target holding ``base`` asks for: each distinct page it lacks, once."""
    have = set(base.iter_fps())
    seen: set[bytes] = set()
    wanted: list[int] = []
    for p, fp in enumerate(index.iter_fps()):
        if fp in UNIFORM_FP or fp in have or fp in seen:
            continue
        seen.add(fp)
        wanted.append(p)
    return [ChunkPlan.of_pages(i // CHUNK_PAGES, wanted[i : i + CHUNK_PAGES])
            for i in range(0, len(wanted), CHUNK_PAGES)]  # fmt: skip


def sample(image: PageSource, plans: list[ChunkPlan],
           reference: PageSource | None = None) -> list[bytes]:  # fmt: skip
    step = max(1, len(plans) // SAMPLE_CHUNKS)
    picked = [plans[i] for i in range(0, len(plans), step)][:SAMPLE_CHUNKS]
    if reference is not None:
        return [delta_body(image, plan.pages, reference) for plan in picked]
    return [b"".join(image.view(p) for p in plan.pages) for plan in picked]


def pick_level(image: PageSource, plans: list[ChunkPlan], mode: str, link: float,
               cores: int, reference: PageSource | None = None,
               clock: Callable[[], float] = time.perf_counter, passes: int = 1,
               fixed_s_per_byte: float = 0.0,
               ) -> tuple[int, list[dict[str, float]]]:  # fmt: skip
    if not plans:
        return 0, []
    samples = measure_levels(sample(image, plans, reference), mode, link, cores, clock,
                             passes=passes, fixed_s_per_byte=fixed_s_per_byte)  # fmt: skip
    table = [{"level": s.level, "MBps_per_core": round(s.bytes_per_s_per_core / 1e6, 1),
              "ratio": round(s.ratio, 4),
              "MBps_model": round(s.rate(link, cores, fixed_s_per_byte) / 1e6, 1)}
             for s in samples]  # fmt: skip
    return choose_level(samples, link, cores, fixed_s_per_byte), table


def _windowed(ex: Executor, plans: list[ChunkPlan], image: PageSource, level: int) -> Iterator[int]:
    window = 8  # chunks in flight: keeps 2 threads busy, holds at most 8 MiB of frames
    futs = []
    for plan in plans:
        futs.append(ex.submit(encode_chunk, 0, plan, image, None, level))
        if len(futs) >= window:
            yield len(futs.pop(0).result())
    for f in futs:
        yield len(f.result())


#: Timed runs of the encode job per figure; the fastest counts (a run another process
#: interrupted says nothing of the code: this machine is shared).
ENCODE_PASSES = 3


def encode_speed(image: PageSource, cores: int, level: int | None = None) -> dict[str, Any]:
    """Logical MB/s of the source's cold-transfer work on ``cores`` threads: index, plan and
    encode every chunk (the fastest of :data:`ENCODE_PASSES` runs), at the level chosen
    for a datacenter link (or ``level``). The level calibration (8 MiB per candidate
    level, once per transfer) is timed apart. It measures the CPU the index and the
    plan cost per byte sent (``fixed_ns_per_byte``) and gives it to the picker: every
    level pays it on the same cores (mesh.hde.level), and without it zstd -5 looked
    faster than storing on 10 Gbit/s where the whole job ran at half storing's speed."""
    with ThreadPoolExecutor(cores) as ex:
        list(ex.map(len, [b""] * cores))  # threads up before anything is timed
        t0 = time.perf_counter()
        cpu0 = _cpu_s()
        calib_ix = build_index(image, ex)
        calib_plans = cold_plan(calib_ix)
        sent = sum(p.count for p in calib_plans) * PAGE_SIZE
        fixed = (_cpu_s() - cpu0) / max(sent, 1)
        table: list[dict[str, float]] = []
        if level is None:
            level, table = pick_level(image, calib_plans, "datacenter", DC_LINK_BPS, cores,
                                      clock=LEVEL_CLOCK, passes=3,
                                      fixed_s_per_byte=fixed)  # fmt: skip
        calibrate_s = time.perf_counter() - t0
        dt = cpu = float("inf")
        wire = 0
        phases: dict[str, float] = {}
        for _ in range(ENCODE_PASSES):
            cpu0 = _cpu_s()
            t0 = time.perf_counter()
            index = build_index(image, ex)
            cpu1 = _cpu_s()
            plans = cold_plan(index)
            cpu2 = _cpu_s()
            wire = sum(_windowed(ex, plans, image, level))
            took = time.perf_counter() - t0
            if took < dt:
                dt, cpu = took, _cpu_s() - cpu0
                # process CPU per phase of the fastest run: what the job costs, apart
                phases = {"index": round(cpu1 - cpu0, 3), "plan": round(cpu2 - cpu1, 3),
                          "chunks": round(cpu0 + cpu - cpu2, 3)}  # fmt: skip
    # CPU seconds say what the wall clock cannot on a shared machine: MB per CPU-second
    # is what one uncontended core would do. Zero pages cost a fingerprint and nothing
    # else, so MB/s over the non-zero pages is the work figure (issue 17 item 6).
    nonzero = image.nbytes - index.page_stats()["zero"] * PAGE_SIZE
    return {"MBps": round(image.nbytes / dt / 1e6, 1), "level": level, "seconds": round(dt, 3),
            "nonzero_MBps": round(nonzero / dt / 1e6, 1), "nonzero_bytes": nonzero,
            "cpu_s": round(cpu, 3), "MB_per_cpu_s": round(image.nbytes / max(cpu, 1e-9) / 1e6, 1),
            "nonzero_MB_per_cpu_s": round(nonzero / max(cpu, 1e-9) / 1e6, 1),
            "busy_cores": round(cpu / dt, 2), "fixed_ns_per_byte": round(fixed * 1e9, 3),
            "cpu_s_by_phase": phases,
            "chunk_bytes": wire, "levels_measured": table,
            "calibrate_s": round(calibrate_s, 3)}  # fmt: skip


def encode_runs(image: PageSource) -> dict[str, Any]:
    """The encode figures of one image: logical MB/s with MB/s over its non-zero pages
    beside each (issue 17 item 6). The level is the one chosen for 2 cores on the
    datacenter link; one core runs at that same level, so the pair says how the job
    scales (a 1-core run choosing its own level chose store where 2 cores chose -5, and
    "2 cores = 1 core at -5" compared storing with -5). zstd -5 and 1 are timed on both
    core counts whatever was chosen: the cheap levels' scaling."""
    e2 = encode_speed(image, 2)
    e1 = encode_speed(image, 1, level=e2["level"])
    m1, m2 = encode_speed(image, 1, level=-5), encode_speed(image, 2, level=-5)
    z1, z2 = encode_speed(image, 1, level=1), encode_speed(image, 2, level=1)
    return {"encode_MBps_1core": e1["MBps"], "encode_MBps_1core_nonzero": e1["nonzero_MBps"],
            "encode_MBps_2cores": e2["MBps"], "encode_MBps_2cores_nonzero": e2["nonzero_MBps"],
            "encode_level": e2["level"], "encode_levels_measured": e2["levels_measured"],
            "encode_link": "datacenter, 10 Gbit/s (1,250 MB/s), 2 cores",
            "encode_fixed_ns_per_byte": e2["fixed_ns_per_byte"],
            "encode_busy_cores_2cores": e2["busy_cores"],
            "encode_calibrate_s": e2["calibrate_s"],
            "encode_MB_per_cpu_s": e1["MB_per_cpu_s"],
            "encode_nonzero_MB_per_cpu_s": e1["nonzero_MB_per_cpu_s"],
            "encode_cpu_s_by_phase_1core": e1["cpu_s_by_phase"],
            "encode_cpu_s_by_phase_1core_at_zstd_minus5": m1["cpu_s_by_phase"],
            "encode_MBps_1core_at_zstd_minus5": m1["MBps"],
            "encode_MBps_2cores_at_zstd_minus5": m2["MBps"],
            "encode_MBps_2cores_at_zstd_minus5_nonzero": m2["nonzero_MBps"],
            "encode_MBps_1core_at_zstd1": z1["MBps"],
            "encode_MBps_2cores_at_zstd1": z2["MBps"],
            "encode_MBps_2cores_at_zstd1_nonzero": z2["nonzero_MBps"]}  # fmt: skip


def fuller_guest(ex: Executor, missing: list[str]) -> dict[str, Any] | None:
    """The encode and cold figures on the fuller guest (bench.corpus.fuller: the
    self-checking guest with most of its RAM in use), or None with the reason."""
    from bench.corpus.fuller import snapshot
    from federation.demo.qemu_guest.build import GuestAssetsMissing

    if shutil.which("qemu-system-x86_64") is None:
        missing.append("fuller_guest: no qemu-system-x86_64 (make qemu-guest installs it)")
        return None
    try:
        snap = snapshot()
    except GuestAssetsMissing as exc:
        missing.append(f"fuller_guest: {exc}")
        return None
    try:
        ram = open_image(snap.path, "fuller")
        ix = build_index(ram, ex)
        c = cold(ram, ix, ex)
        c1 = transfer(ram, ix, PageStore(), 1, ex)
        out = {**snap.info, **image_figures(ram, ix), "cold_wire_bytes": c["wire_bytes"],
               "cold_level": c["level"], "cold_wire_bytes_at_zstd1": c1["wire_bytes"],
               "zstd1_bytes": whole_zstd(ram, 1), **encode_runs(ram)}  # fmt: skip
        ram.close()
        return out
    finally:
        snap.close()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def whole_zstd(image: PageSource, level: int) -> int:
    """The whole image through one zstd stream (2 worker threads), in 4 MiB pieces."""
    c = zstandard.ZstdCompressor(level=level, threads=2).compressobj()
    n = 0
    for p in range(0, image.page_count, 1024):
        n += len(c.compress(image.view(p, min(1024, image.page_count - p))))
    return n + len(c.flush())


def fingerprint_speeds(image: PageSource) -> dict[str, float]:
    """Per-page hashing speed, XXH3-128 vs BLAKE2b-128, on up to 64 MiB of the image."""
    import xxhash

    n = min(image.page_count, 16384)
    mv = image.view(0, n)
    out = {}

    def blake(b: memoryview) -> bytes:
        return hashlib.blake2b(b, digest_size=16).digest()

    def run(fn: Any, lo: int, hi: int) -> None:
        for i in range(lo * PAGE_SIZE, hi * PAGE_SIZE, PAGE_SIZE):
            fn(mv[i : i + PAGE_SIZE])

    for name, fn in (("xxh3_128", xxhash.xxh3_128_digest), ("blake2b_128", blake)):
        t0 = time.perf_counter()
        run(fn, 0, n)
        out[f"{name}_MBps_1core"] = round(n * PAGE_SIZE / (time.perf_counter() - t0) / 1e6, 1)
        with ThreadPoolExecutor(2) as ex:
            t0 = time.perf_counter()
            halves = [ex.submit(run, fn, k * n // 2, (k + 1) * n // 2) for k in (0, 1)]
            for h in halves:
                h.result()
        out[f"{name}_MBps_2threads"] = round(n * PAGE_SIZE / (time.perf_counter() - t0) / 1e6, 1)
    return out


def image_figures(image: PageSource, index: PageIndex) -> dict[str, Any]:
    st = index.page_stats()
    return {"bytes": image.nbytes, "zero_page_share": round(st["zero"] / st["pages"], 4),
            "uniform_page_share": round(st["uniform"] / st["pages"], 4),
            "duplicate_page_share": round(st["duplicate"] / st["pages"], 4)}  # fmt: skip


def transfer(
    image: Image, index: PageIndex, store: PageStore, level: int, ex: Executor,
    refs: dict[bytes, tuple[PageSource, PageIndex]] | None = None, name: str = "vm",
) -> dict[str, Any]:  # fmt: skip
    refs = refs or {}
    r = run_transfer(image=image, index=index, name=name, store=store, level=level,
                     references={k: v[0] for k, v in refs.items()},
                     reference_indexes={k: v[1] for k, v in refs.items()},
                     executor=ex)  # fmt: skip
    if not r.verified:
        raise RuntimeError(f"HDE transfer did not verify: {r.failure}")
    whole = image.view(0, image.page_count)
    if r.image is None or bytes(r.image.view(0, r.image.page_count)) != bytes(whole):
        raise RuntimeError("HDE transfer verified but the image differs")
    return {"wire_bytes": r.wire_bytes, "control_bytes": r.control_bytes,
            "control_by_tag": r.control_by_tag, "chunks": r.chunks_sent, **r.stats}  # fmt: skip


def cold(
    image: Image, index: PageIndex, ex: Executor, store: PageStore | None = None
) -> dict[str, Any]:
    level, table = pick_level(image, cold_plan(index), "internet", COLD_LINK_BPS, 2,
                              clock=LEVEL_CLOCK)  # fmt: skip
    out = transfer(image, index, store or PageStore(), level, ex)
    out.update(level=level, levels_measured=table)
    return out


# --------------------------------------------------------------------------- runs


def corpus_images(missing: list[str]) -> dict[str, Any] | None:
    """Paths of the corpus images HDE needs, or None (with the reason in ``missing``)."""
    try:
        manifest = load_manifest(check_sizes=False)
    except ManifestError as exc:
        missing.append(f"corpus: {exc}")
        return None
    for mib in (1024, 256):
        try:
            found = {"mib": mib, "t0": manifest.ram(mib, "A", 0), "t60": manifest.ram(mib, "A", 60),
                     "root": manifest.root}  # fmt: skip
        except ManifestError:
            continue
        try:
            found["sibling"] = manifest.ram(mib, "B", 60)
        except ManifestError as exc:
            missing.append(f"sibling: {exc}")
        try:
            found["disk_v1"] = manifest.path(manifest.one("disk", version="v1"))
            found["disk_v2"] = manifest.path(manifest.one("disk", version="v2"))
        except ManifestError as exc:
            missing.append(f"disk: {exc}")
        return found
    missing.append("corpus: no RAM snapshots of workload A at t0 and t0+60 s in the manifest")
    return None


def qemu_bytes(mib: int, missing: list[str]) -> tuple[int | None, dict[str, Any]]:
    try:
        from bench.qemu import measure_qemu_multifd_zstd

        r = measure_qemu_multifd_zstd(guest_mib=mib, workload="A", at_s=60, mode="snapshot")
        return int(r["wire_bytes"]), {k: r[k] for k in ("qemu_version", "channels", "zstd_level")
                                      if k in r}  # fmt: skip
    except Exception as exc:  # QEMU missing, failed to start or migrate: say so, never guess
        missing.append(f"qemu_multifd_zstd_bytes: {type(exc).__name__}: {exc}")
        return None, {}


def ratio(a: int | None, b: int | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def run(use_corpus: bool, use_qemu: bool, quick: bool, fuller: bool = False) -> dict[str, Any]:
    missing: list[str] = []
    found = corpus_images(missing) if use_corpus else None
    if not use_corpus:
        missing.append("corpus: not used (--no-corpus)")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dwcp-bench-hde-") as tmp, \
            ThreadPoolExecutor(2) as ex:  # fmt: skip
        if found is not None:
            ram, ram0 = open_image(found["t60"], "t60"), open_image(found["t0"], "t0")
            out["corpus"] = (f"{found['root']}: {found['mib']} MiB guest, workload A RAM at t0+60 s"
                             " (warm base: t0; sibling: workload B at t0+60 s)")  # fmt: skip
            extra: dict[str, Any] = {}
        else:
            dirs = sorted(str(p) for p in Path("/usr/lib").glob("python3*") if p.is_dir())
            fs_path, fs_what = build_fs_image(dirs, Path(tmp), (4 << 20) if quick else (96 << 20))
            fs = open_image(fs_path, "fs")
            regions = memory_regions((16 << 20) if quick else MEMORY_CAP)
            snap0 = snapshot_memory(regions)
            work = real_work(fs, 0.05 if quick else WORK_S)
            snap1 = snapshot_memory(regions)
            ram0, ram = Image(snap0, "memory-t0"), Image(snap1, "memory-t1")
            out["corpus"] = ("no corpus: this process's own memory (readable mappings of "
                             f"/proc/self/maps, {ram.nbytes >> 20} MiB) while holding a {fs_what}")
            fs_ix = build_index(fs, ex)
            extra = {"fs_image": {
                "what": fs_what, **image_figures(fs, fs_ix),
                "zstd1_bytes": whole_zstd(fs, 1), "zstd3_bytes": whole_zstd(fs, 3),
                "cold_wire_bytes": cold(fs, fs_ix, ex)["wire_bytes"]}}  # fmt: skip
        ix = build_index(ram, ex)
        ix0 = build_index(ram0, ex)
        c = cold(ram, ix, ex)
        c1 = transfer(ram, ix, PageStore(), 1, ex)
        out.update(ram_bytes=ram.nbytes, cold_wire_bytes=c["wire_bytes"], cold_level=c["level"],
                   cold_wire_bytes_at_zstd1=c1["wire_bytes"],
                   cold_levels_measured=c["levels_measured"],
                   zstd1_bytes=whole_zstd(ram, 1), zstd3_bytes=whole_zstd(ram, 3))  # fmt: skip
        qb: int | None = None
        qinfo: dict[str, Any] = {}
        if found is not None and use_qemu:
            qb, qinfo = qemu_bytes(found["mib"], missing)
        elif found is not None:
            missing.append("qemu_multifd_zstd_bytes: not measured (--no-qemu)")
        else:
            missing.append("qemu_multifd_zstd_bytes: needs the corpus guest (make corpus)")
        # the protocol's gain apart from compression's: DWCP at QEMU's zstd level 1
        out.update(qemu_multifd_zstd_bytes=qb, qemu=qinfo or None,
                   cold_ratio_vs_qemu=ratio(c["wire_bytes"], qb),
                   cold_ratio_vs_qemu_at_zstd1=ratio(c1["wire_bytes"], qb))  # fmt: skip
        if found is not None and "sibling" in found:
            sib = open_image(found["sibling"], "sibling")
            store = PageStore()
            store.add("sibling", sib, build_index(sib, ex))
            s = cold(ram, ix, ex, store)
            out.update(sibling_wire_bytes=s["wire_bytes"],
                       sibling_ratio_vs_qemu=ratio(s["wire_bytes"], qb))  # fmt: skip
        else:
            if found is None:
                missing.append("sibling_ratio_vs_qemu: needs the corpus sibling guest")
            out.update(sibling_wire_bytes=None, sibling_ratio_vs_qemu=None)
        store = PageStore()
        store.add("vm", ram0, ix0)
        wl, wtable = pick_level(ram, warm_plan(ix, ix0), "internet", COLD_LINK_BPS, 2,
                                reference=ram0, clock=LEVEL_CLOCK)  # fmt: skip
        w = transfer(ram, ix, store, wl, ex, refs={ix0.root: (ram0, ix0)})
        w.update(level=wl, levels_measured=wtable)
        store1 = PageStore()
        store1.add("vm", ram0, ix0)
        w1 = transfer(ram, ix, store1, 1, ex, refs={ix0.root: (ram0, ix0)})
        out["warm_level"] = wl
        out["warm_wire_bytes"] = w["wire_bytes"]
        out["warm_wire_bytes_at_zstd1"] = w1["wire_bytes"]
        if found is not None:
            out["warm_wire_fraction"] = round(w["wire_bytes"] / ram.nbytes, 5)
        else:
            out["warm_wire_fraction"] = None
            missing.append("warm_wire_fraction: needs corpus snapshots t0 and t0+60 s")
            extra["process_memory_warm"] = {
                "what": "target holds this process's memory at t0, source sends it again after "
                        "the work below (NOT the t0 -> t0+60 s guest figure)",
                "warm_wire_fraction": round(w["wire_bytes"] / ram.nbytes, 5), **work}  # fmt: skip
        out["warm_detail"] = w
        out.update(encode_runs(ram))
        out.update(image_figures(ram, ix))
        out.pop("bytes")
        out["fingerprint"] = fingerprint_speeds(ram)
        if found is not None and "disk_v1" in found:
            v1, v2 = open_image(found["disk_v1"], "v1"), open_image(found["disk_v2"], "v2")
            i1, i2 = build_index(v1, ex), build_index(v2, ex)
            dstore = PageStore()
            dstore.add("disk", v1, i1)
            d = transfer(v2, i2, dstore, c["level"], ex, refs={i1.root: (v1, i1)}, name="disk")
            extra["disk_v1_to_v2"] = {"wire_bytes": d["wire_bytes"], "v2_bytes": v2.nbytes,
                                      "zstd1_bytes": whole_zstd(v2, 1)}  # fmt: skip
        out.update(extra)
        if fuller:
            out["fuller_guest"] = fuller_guest(ex, missing)
        else:
            missing.append("fuller_guest: not asked (--no-fuller)")
    out["missing"] = missing
    return out


def _main(args: argparse.Namespace) -> int:
    result = run(not args.no_corpus, not args.no_qemu, args.quick, not args.no_fuller)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("hde", help="HDE wire bytes and encode speed on real VM state")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.add_argument("--no-corpus", action="store_true", help="ignore the corpus even if present")
    p.add_argument("--no-qemu", action="store_true", help="skip QEMU's own migration baseline")
    p.add_argument("--quick", action="store_true", help="small corpus-free data (test smoke)")
    p.add_argument("--no-fuller", action="store_true",
                   help="skip the fuller guest (boots the self-checking guest, ~1 min)")
    p.set_defaults(func=_main)
