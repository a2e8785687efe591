"""Where a live migration's bytes go, measured offline on RAM snapshots of the bench guest.

``python -m bench.live_bytes take DIR``: boot the guest of ``dwcp bench live`` once (256
MiB, ``dwcp.fill=60``, TCG), and copy its RAM (QMP ``stop``, copy, ``cont``) when it is
ready to migrate (20 s of guest time after its ballast: ``t20.raw``), 1, 2 and 4 s of
guest time later (what pre-copy rounds see) and 60, 62 and 64 s later (the return trip's
moment: ``t80.raw``...). ``python -m bench.live_bytes measure DIR [--level N]``: HDE's
bytes on those snapshots, without booting again:

- ``cold``: an HDE transfer of ``t20`` to an empty target (round 1 of the first trip),
  chunks in page order and grouped by similarity (:mod:`mesh.hde.similar`); beside it
  one zstd stream over the same pages with long-distance matching (what a compression
  context across the whole transfer would give);
- ``return_round1``: ``t80`` to a target holding ``t24`` (the copy the first host kept);
  its ``work``: CPU and wall seconds of that round as the live migration does it, the
  target's kept copy as its own base against a copy of it as before;
- ``rounds``: what changed between two snapshots 1-2 s of guest time apart, sent as a
  pre-copy round sends it (XOR against the page the target holds), in page order
  without copies and grouped with copies (:func:`mesh.hde.codec.grouped_plans`), and
  how many of those pages are equal to another page of the round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from mesh.hde.codec import ChunkPlan, encode_chunk, grouped_plans
from mesh.hde.image import PAGE_SIZE, Image, ImageWriter, open_image
from mesh.hde.index import build_index
from mesh.hde.loopback import run_transfer
from mesh.hde.messages import CHUNK_PAGES
from mesh.hde.similar import page_sketches
from mesh.hde.store import PageStore

__all__ = ["take", "measure"]

#: Seconds of guest time after the first snapshot (at 20 s) at which the others are taken.
LATER = (1, 2, 4, 60, 62, 64)
ROUNDS = (("t20", "t21"), ("t21", "t22"), ("t80", "t82"), ("t82", "t84"))


def _ready_at(heartbeat: int) -> Callable[[Any], bool]:
    """The guest wrote its ballast and its heartbeat counter reached ``heartbeat``."""
    return lambda c: bool(c.filled and c.last_heartbeat >= heartbeat)


def take(out: Path, mib: int = 256, fill: int = 60, at_s: int = 20) -> list[dict[str, Any]]:
    from federation.demo.qemu_guest.build import guest_cmdline, load_assets
    from federation.demo.qemu_guest.console import wait_console
    from federation.vms.qemu_machine import QemuProcess
    from federation.vms.qemu_spec import QEMU, VmSpec, qemu_argv

    out.mkdir(parents=True, exist_ok=True)
    assets = load_assets()
    spec = VmSpec(str(assets.kernel), str(assets.initrd), mib, guest_cmdline(fill, False))
    work = out / "work"
    work.mkdir(exist_ok=True)
    ram, console = work / "ram", work / "console.log"
    with open(ram, "wb") as f:
        f.truncate(mib << 20)
    argv = qemu_argv(QEMU, spec, "tcg", ram, [], console, work / "qmp.sock",
                     work / "qemu.pid", False)
    proc = QemuProcess.spawn(argv, work / "qemu.log", ram, work / "qmp.sock",
                             work / "qemu.pid")
    started = time.monotonic()
    taken: list[dict[str, Any]] = []
    try:
        first: int | None = None
        for later in (0, *LATER):
            goal = at_s * 10 if first is None else first + later * 10
            con = wait_console([console], _ready_at(goal), 900.0,
                               f"{at_s + later} s of guest time", alive=proc.alive)
            first = con.last_heartbeat if first is None else first
            proc.qmp.execute("stop")
            shutil.copyfile(ram, out / f"t{at_s + later}.raw")
            proc.qmp.execute("cont")
            taken.append({"file": f"t{at_s + later}.raw", "heartbeat": con.last_heartbeat,
                          "wall_s": round(time.monotonic() - started, 1),
                          "errors": list(con.errors)[:3]})
    finally:
        proc.quit()
        shutil.rmtree(work, ignore_errors=True)
    return taken


def _transfer(img: Image, level: int, base: Image | None, similar: bool,
              ex: ThreadPoolExecutor) -> dict[str, Any]:
    ix = build_index(img, ex)
    store = PageStore()
    refs: dict[str, Any] = {}
    if base is not None:
        bix = build_index(base, ex)
        store.add("vm", base, bix)
        refs = {"references": {bix.root: base}, "reference_indexes": {bix.root: bix}}
    cpu = time.process_time()
    r = run_transfer(image=img, index=ix, name="vm", store=store, level=level, executor=ex,
                     similar=page_sketches(img) if similar else None, **refs)
    if not r.verified:
        raise RuntimeError(f"transfer did not verify: {r.failure}")
    return {"wire_bytes": r.wire_bytes, "chunk_bytes": r.chunk_bytes,
            "control_bytes": r.control_bytes, "cpu_s": round(time.process_time() - cpu, 2),
            **r.stats}  # fmt: skip


def _fixed(writer: ImageWriter) -> Callable[[int], ImageWriter]:
    return lambda _pages: writer


def _return_round1_work(old: Image, live: Image, level: int,
                        ex: ThreadPoolExecutor) -> dict[str, Any]:
    """CPU and wall seconds of a return's round 1 as ``LiveMigration.first_round`` does it
    (shadow copy and index, the target's base, the transfer with its root), ``in_place``
    (the incoming image is its own base: indexed once, root refreshed over what was
    written) and as before (a copy of the kept image as base, a full re-index)."""
    n = old.page_count
    out: dict[str, Any] = {}
    for way in ("copied_base", "in_place"):
        writer = ImageWriter(bytearray(old.view(0, n)), "incoming")  # the kept copy
        cpu, wall = time.process_time(), time.perf_counter()
        shadow = ImageWriter(bytearray(live.view(0, n)), "shadow")
        ix = build_index(shadow, ex)
        store = PageStore()
        if way == "in_place":
            base_ix = build_index(writer, ex)
            store.add("vm", writer, base_ix)
        else:
            base = Image(bytearray(writer.view(0, n)), "base")
            base_ix = build_index(base, ex)
            store.add("vm", base, base_ix)
        r = run_transfer(image=shadow, index=ix, name="vm", store=store, level=level,
                         executor=ex, make_sink=_fixed(writer),
                         sink_index=base_ix if way == "in_place" else None)
        out[way] = {"cpu_s": round(time.process_time() - cpu, 3),
                    "wall_s": round(time.perf_counter() - wall, 3),
                    "wire_bytes": r.wire_bytes}
        if not r.verified or bytes(writer.view(0, n)) != bytes(live.view(0, n)):
            raise RuntimeError(f"return round 1 ({way}) did not verify: {r.failure}")
    return out


def _ldm_stream(img: Image, level: int) -> int:
    """The distinct non-uniform pages of ``img`` through one zstd stream, 128 MiB window
    with long-distance matching."""
    seen: set[bytes] = set()
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=27,
                                                            enable_ldm=True)
    c = zstandard.ZstdCompressor(compression_params=params).compressobj()
    n = 0
    for p in range(img.page_count):
        page = img.view(p)
        if page.tobytes().count(page[0]) == PAGE_SIZE:
            continue
        k = xxhash.xxh3_128_digest(page)
        if k not in seen:
            seen.add(k)
            n += len(c.compress(page))
    return n + len(c.flush())


def _round(before: Image, after: Image, level: int) -> dict[str, Any]:
    changed = [p for p in range(after.page_count) if after.view(p) != before.view(p)]
    keys = [xxhash.xxh3_128_digest(after.view(p)) for p in changed]
    ordered = [ChunkPlan.of_pages(i // CHUNK_PAGES, changed[i : i + CHUNK_PAGES])
               for i in range(0, len(changed), CHUNK_PAGES)]
    return {"changed_pages": len(changed), "equal_to_another_page": len(keys) - len(set(keys)),
            "page_order_bytes": sum(len(encode_chunk(1, p, after, before, level))
                                    for p in ordered),
            "grouped_copies_bytes": sum(len(encode_chunk(1, p, after, before, level,
                                                         copies=True))
                                        for p in grouped_plans(after, changed))}  # fmt: skip


def measure(d: Path, level: int = 9) -> dict[str, Any]:
    snap = {p.stem: open_image(p, p.stem) for p in sorted(d.glob("t*.raw"))}
    out: dict[str, Any] = {"level": level, "snapshots": sorted(snap)}
    with ThreadPoolExecutor(2) as ex:
        out["cold"] = {"page_order": _transfer(snap["t20"], level, None, False, ex),
                       "similar": _transfer(snap["t20"], level, None, True, ex),
                       "one_ldm_stream_bytes": _ldm_stream(snap["t20"], level)}
        out["return_round1"] = {
            "page_order": _transfer(snap["t80"], level, snap["t24"], False, ex),
            "similar": _transfer(snap["t80"], level, snap["t24"], True, ex),
            "work": _return_round1_work(snap["t24"], snap["t80"], level, ex)}
    out["rounds"] = {f"{a}->{b}": _round(snap[a], snap[b], level) for a, b in ROUNDS}
    for img in snap.values():
        img.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("take", help="boot the bench guest once and copy its RAM")
    t.add_argument("dir", type=Path)
    m = sub.add_parser("measure", help="HDE's bytes on the snapshots in DIR")
    m.add_argument("dir", type=Path)
    m.add_argument("--level", type=int, default=9)
    args = p.parse_args(argv)
    if args.cmd == "take":
        print(json.dumps(take(args.dir)))
    else:
        print(json.dumps(measure(args.dir, args.level)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
