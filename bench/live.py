"""``dwcp bench live --json``: live migration of the self-checking guest, QEMU's own
migration beside DWCP's, each on the same guest image and workload, migrated at the same
moment after boot, over (a) loopback through a byte-counting relay and (b) a veth pair
between two network namespaces shaped to 100 Mbit/s with tbf (docs/qemu.md).

Contenders (:data:`CONTENDERS`), each a function ``(Setup, Path) -> dict``:

- ``qemu_precopy``: QEMU's plain pre-copy (one stream, no compression);
- ``qemu_multifd_zstd1`` and ``qemu_multifd_zstd<N>``: multifd (2 channels) with zstd at
  level 1 (QEMU's default) and at ``--level`` (default 3, zstd's own default);
- ``dirty_tracking``: on the same booted guest, what a rescan of page digests costs (per
  page, and per 16 KiB group as the migration does) and whether the kernel offers
  soft-dirty bits; the guest's share of zero pages;
- ``dwcp_inprocess``: :class:`federation.vms.live_migration.LiveMigration` between two
  qemu backends in this process, loopback only: its bytes are HDE frames, diff messages
  and device state counted in process, not on a wire. The node-to-node DWCP run (AMST over
  the mesh, ``dwcp_wire_bytes`` and the ratios of issue 17) plugs in as another contender
  once the node drives the qemu backend. It migrates there and, ``--return-after`` seconds
  of guest time later, back to the first backend, which still holds its earlier copy
  (``return_bytes_ratio_vs_there``; QEMU sends everything again on a return).

Every QEMU contender runs with ``auto-converge`` and a 300 ms ``downtime-limit``, like
DWCP's rounds (:data:`QEMU_CAPABILITIES`), and is bounded (:func:`qemu_limit`): one that
has not converged by its limit is cancelled, reported ``converged: false`` with its time
and bytes so far (its ``guest``: the source ran on, counter and checks intact) and left
out of the best QEMU (``comparison.<link>.qemu_left_out``).

Per run: boot a fresh guest (``--fill`` percent of its free RAM in ballast, no disk: QEMU's
migration moves no disk), wait until it wrote its ballast and its heartbeat counter reached
``--at`` seconds of guest time, migrate, resume the target and check that the counter
continued and the checks passed (``ok``). Wire bytes: the relay's forward bytes (loopback)
or the source veth's tx bytes (tbf, IP packets with headers). Needs QEMU and ``make
qemu-guest``; the tbf runs need root and iproute2 (``missing`` says what was skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.corpus.relay import CountingRelay
from bench.frame_pipe import FramePipe, loopback, over_tbf
from bench.netns import ADDRESS_B, FarLink, TbfLink, netns_missing
from bench.qemu import MAX_BANDWIDTH, MigrationError, qemu_version
from consensus.ledger import SetPolicy
from federation.dataplane.v3_protocol import choose_chunk_level
from federation.demo.processes import START_BUDGET, DemoFailed, LocalFederation
from federation.demo.qemu_demo import (
    create_guest,
    leg_report,
    power_off_guests,
    running_at,
    write_qemu_configs,
)
from federation.demo.qemu_guest.build import (
    GuestAssets,
    GuestAssetsMissing,
    guest_cmdline,
    load_assets,
)
from federation.demo.qemu_guest.console import Console, read_console, wait_console
from federation.demo.scenario import Demo
from federation.vms.accel import probe_accel
from federation.vms.dirty_scan import SentDigests, scan_digests, soft_dirty_available
from federation.vms.live_migration import LiveMigration
from federation.vms.qemu_backend import QemuBackend
from federation.vms.qemu_machine import QemuProcess
from federation.vms.qemu_spec import QEMU, VmSpec, qemu_argv
from mesh.hde.image import PAGE_SIZE, ImageWriter
from mesh.hde.loopback import Carry
from mesh.hde.messages import CHUNK_PAGES
from mesh.links.modes import ModeLimits, classify

__all__ = ["register", "measure", "compare", "Setup"]

#: The guest: 256 MiB (the corpus's small guest size) filled to about 60 % of its free
#: memory, which left 11 % zero pages in a 128 MiB guest (docs/qemu.md); issue 17 asks for
#: under 30 %.
GUEST_MIB = 256
FILL_PERCENT = 60
#: Seconds of guest time (heartbeats / 10) after boot at which every contender migrates.
AT_S = 20
#: multifd-channels default (migration/options.c DEFAULT_MIGRATE_MULTIFD_CHANNELS).
CHANNELS = 2
#: The second level: zstd's own default (ZSTD_CLEVEL_DEFAULT).
SECOND_LEVEL = 3
#: The return trip waits this long at the target (issue 17: "run 60 s, migrate back").
RETURN_AFTER_S = 60
#: Heartbeats and verified rounds the target must print after the migration to count as ok.
AFTER_HEARTBEATS, AFTER_CHECKS = 20, 2
BOOT_TIMEOUT = 300.0
#: The shaped link's rate (issue 17: 100 Mbit/s).
TBF_MBIT = 100
TARGET_PORT = 4444  # QEMU's documentation examples use tcp:...:4444 for -incoming


@attrs.frozen
class Setup:
    spec: VmSpec
    accel: str
    at_s: int
    level: int
    #: QEMU's contenders with ``auto-converge`` (the default, like DWCP's rounds); off
    #: only to reproduce plain pre-copy that does not converge (``--qemu-no-auto-converge``)
    auto_converge: bool = True


def _heartbeat_at(at_s: int) -> int:
    return at_s * 10  # the guest prints DWCP-HB every 0.1 s of guest time


def _ready(at_s: int) -> Callable[[Console], bool]:
    """The moment every contender migrates: the ballast is written and the heartbeat
    counter reached ``at_s`` seconds of guest time."""
    return lambda c: c.filled and c.last_heartbeat >= _heartbeat_at(at_s)


class _Guest:
    """A QEMU of the bench guest in ``work`` (source, or ``incoming`` target)."""

    def __init__(self, setup: Setup, work: Path, incoming: bool,
                 prefix: Sequence[str] = ()) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.console = work / "console.log"
        ram = work / "ram"
        with open(ram, "wb") as f:
            f.truncate(setup.spec.memory_mib << 20)
        argv = qemu_argv(QEMU, setup.spec, setup.accel, ram, [], self.console,
                         work / "qmp.sock", work / "qemu.pid", incoming)
        self.proc = QemuProcess.spawn([*prefix, *argv], work / "qemu.log", ram,
                                      work / "qmp.sock", work / "qemu.pid")

    def close(self) -> None:
        self.proc.quit()


#: QEMU's settings every contender runs with, its best for a live guest and like DWCP's
#: (docs/BENCHMARKS.md, "QEMU's contenders: bounded, and at their best setting"):
#: ``auto-converge`` (QEMU throttles the vCPUs when the dirty rate outruns the link, as
#: DWCP's round policy does, federation.migration.precopy; QEMU's own throttle steps,
#: 20 % then +10 % up to 99 %, are left at their defaults), and ``downtime-limit`` 300 ms, the
#: limit DWCP's rounds aim at (federation.node.assembly's ``downtime_limit_ms``;
#: QEMU 7.2's default too, set here so a changed default cannot move the baseline).
QEMU_CAPABILITIES = ("events", "auto-converge")
DOWNTIME_LIMIT_MS = 300


def _configure(g: _Guest, multifd: bool, level: int, source: bool,
               max_bandwidth: int = MAX_BANDWIDTH, auto_converge: bool = True) -> None:
    caps = [{"capability": c, "state": True} for c in QEMU_CAPABILITIES
            if auto_converge or c != "auto-converge"]
    if multifd:
        caps.append({"capability": "multifd", "state": True})
    g.proc.qmp.execute("migrate-set-capabilities", capabilities=caps)
    params: dict[str, Any] = {}
    if multifd:
        # level 0: DWCP chose to store; QEMU's equivalent is multifd without compression
        params.update({"multifd-channels": CHANNELS,
                       "multifd-compression": "zstd" if level > 0 else "none"})
        if source and level > 0:
            params["multifd-zstd-level"] = level
    if source:
        # QEMU's default max-bandwidth is 128 MiB/s: never throttle the baseline below
        # what the link carries (bench.qemu.MAX_BANDWIDTH)
        params["max-bandwidth"] = max_bandwidth
        params["downtime-limit"] = DOWNTIME_LIMIT_MS
    if params:
        g.proc.qmp.execute("migrate-set-parameters", **params)


def _settings(g: _Guest) -> dict[str, Any]:
    """What the source QEMU will migrate with, as it reports it (not as we asked)."""
    caps = {c["capability"]: c["state"]
            for c in g.proc.qmp.execute("query-migrate-capabilities")}
    params = g.proc.qmp.execute("query-migrate-parameters")
    return {"capabilities": sorted(k for k, on in caps.items() if on),
            **{k: params.get(k) for k in ("downtime-limit", "max-bandwidth",
                                          "cpu-throttle-initial", "cpu-throttle-increment",
                                          "max-cpu-throttle", "multifd-channels",
                                          "multifd-compression", "multifd-zstd-level")}}


#: A QEMU contender that has not converged after this long is cancelled (the floor of
#: :func:`qemu_limit`): plain pre-copy of a guest dirtying faster than the link never
#: ends on its own (docs/BENCHMARKS.md, the quiet run of 2026-12-08 03:11).
QEMU_LIMIT_FLOOR_S = 120.0
#: ... or after this many times the time the guest's whole RAM takes on the link.
QEMU_LIMIT_RAM_TIMES = 4
#: The migration's own end after ``migrate_cancel``, and the target's after the source's.
CANCEL_WAIT_S = 60.0


def qemu_limit(mib: int, rate_mbit: float | None) -> tuple[float, str]:
    """(seconds, how they were derived) a QEMU contender may take before it is cancelled:
    max(:data:`QEMU_LIMIT_FLOOR_S`, :data:`QEMU_LIMIT_RAM_TIMES` x the guest's RAM over
    the link's rate); an unshaped link (``rate_mbit`` None) gets the floor."""
    if rate_mbit is None:
        return QEMU_LIMIT_FLOOR_S, f"{QEMU_LIMIT_FLOOR_S:g} s (unshaped link: the floor)"
    ram_s = QEMU_LIMIT_RAM_TIMES * (mib << 20) * 8 / (rate_mbit * 1e6)
    return (max(QEMU_LIMIT_FLOOR_S, round(ram_s, 1)),
            f"max({QEMU_LIMIT_FLOOR_S:g} s, {QEMU_LIMIT_RAM_TIMES} x {mib} MiB / "
            f"{rate_mbit:g} Mbit/s = {ram_s:.1f} s)")


#: How often a running migration's state is asked (``query-migrate``): the resolution of
#: a QEMU contender's ``total_s``. A QMP read that times out closes the session
#: (federation.vms.qmp), so the limit is kept by asking, not by a timed wait for the event.
MIGRATION_POLL_S = 0.02


def _migration_end(g: _Guest, what: str, deadline: float) -> str | None:
    """The migration's end at ``g`` ("completed", or "cancelled" after our cancel) or None
    if ``deadline`` (monotonic) came first; a failure raises MigrationError."""
    while True:
        info = g.proc.qmp.execute("query-migrate")
        status = info.get("status")
        if status in ("completed", "cancelled"):
            return str(status)
        if status == "failed":
            raise MigrationError(f"{what}: {status}: {info.get('error-desc')}")
        if time.monotonic() >= deadline:
            return None
        time.sleep(MIGRATION_POLL_S)


def _guest_ok(logs: list[Path], offsets: list[int], before: int,
              alive: Callable[[], bool]) -> dict[str, Any]:
    """Did the target keep the counter and the checks (no reboot, no error, no gap)? A
    guest that did not keeps its console logs in :data:`FAILED_LOGS` (named in ``logs``)."""
    try:
        con = wait_console(logs, lambda c: c.last_heartbeat >= before + AFTER_HEARTBEATS
                           and len(c.checks) >= AFTER_CHECKS, 120.0,
                           "heartbeats and checks after the migration", offsets, alive)
        ok = con.boots == 0 and not con.errors and not con.counter_gaps()
        out: dict[str, Any] = {"ok": ok, "counter_at_fence": before,
                               "counter_gaps": con.counter_gaps()[:5],
                               "errors": list(con.errors)[:5]}
    except Exception as exc:  # noqa: BLE001 - a failed guest is a figure, not a crash
        out = {"ok": False, "why": str(exc)[:300], "counter_at_fence": before}
    if not out["ok"]:
        kept = Path(tempfile.mkdtemp(prefix="guest-", dir=_failed_logs()))
        for i, log in enumerate(logs):
            if log.exists():
                shutil.copyfile(log, kept / f"{i}-{log.parent.name}-{log.name}")
        out["logs"] = str(kept)
    return out


#: Where the console logs of a guest that failed its checks are kept (the run's scratch
#: directory is removed): the evidence of what went wrong.
FAILED_LOGS = Path(tempfile.gettempdir()) / "dwcp-bench-live-failures"


def _failed_logs() -> Path:
    FAILED_LOGS.mkdir(parents=True, exist_ok=True)
    return FAILED_LOGS


def _boot_source(setup: Setup, work: Path, prefix: Sequence[str]) -> _Guest:
    src = _Guest(setup, work / "src", False, prefix)
    wait_console([src.console], _ready(setup.at_s), BOOT_TIMEOUT,
                 f"the ballast and {setup.at_s} s of guest time", alive=src.proc.alive)
    return src


def _qemu_run(setup: Setup, work: Path, multifd: bool, level: int, tbf: bool,
              limit_s: float | None = None, max_bandwidth: int = MAX_BANDWIDTH
              ) -> dict[str, Any]:
    """One QEMU contender: boot the source, migrate it at ``setup.at_s`` to a fresh target
    over loopback (the counting relay) or the 100 Mbit/s tbf pair, resume the target and
    check the guest. A migration not completed after ``limit_s`` (default
    :func:`qemu_limit` of the guest and the link) is cancelled (``migrate_cancel``): the
    run is ``converged: false`` with its time and bytes so far, and ``guest`` is then the
    *source's* check (it must run on, counter and checks intact)."""
    rate = TBF_MBIT if tbf else None
    limit, why = qemu_limit(setup.spec.memory_mib, rate) if limit_s is None else (
        limit_s, f"{limit_s:g} s (given)")
    print(f"bench live: a QEMU contender is cancelled after {limit:g} s: {why}",
          file=sys.stderr, flush=True)
    link = TbfLink(TBF_MBIT).open() if tbf else None
    guests: list[_Guest] = []
    try:
        src = _boot_source(setup, work, link.exec_prefix("a") if link else ())
        guests.append(src)
        dst = _Guest(setup, work / "dst", True, link.exec_prefix("b") if link else ())
        guests.append(dst)
        _configure(src, multifd, level, True, max_bandwidth, setup.auto_converge)
        _configure(dst, multifd, level, False, auto_converge=setup.auto_converge)
        settings = _settings(src)
        relay: CountingRelay | None = None
        if link is None:
            port = _free_port()
            dst.proc.qmp.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            relay = CountingRelay(("127.0.0.1", port))
            uri = f"tcp:{relay.address[0]}:{relay.address[1]}"
            sent_before = 0
        else:
            dst.proc.qmp.execute("migrate-incoming", uri=f"tcp:{ADDRESS_B}:{TARGET_PORT}")
            uri = f"tcp:{ADDRESS_B}:{TARGET_PORT}"
            sent_before = link.tx_bytes("a") + link.tx_bytes("b")

        def wire_now() -> int:
            if relay is not None:
                return relay.forward_bytes + relay.backward_bytes
            assert link is not None
            return link.tx_bytes("a") + link.tx_bytes("b") - sent_before

        src_offset = src.console.stat().st_size
        try:
            started = time.monotonic()
            src.proc.qmp.execute("migrate", uri=uri)
            end = _migration_end(src, "source", started + limit)
            if end is None:
                # the limit passed: QEMU's figures so far (a cancelled migration reports
                # none), then migrate_cancel
                info = src.proc.qmp.execute("query-migrate")
                src.proc.qmp.execute("migrate_cancel")
                end = _migration_end(src, "source", time.monotonic() + CANCEL_WAIT_S)
                if end is None:
                    raise MigrationError(f"source: still migrating {CANCEL_WAIT_S:g} s "
                                         f"after migrate_cancel")
                if end == "cancelled":
                    return _not_converged(src, info, time.monotonic() - started,
                                          wire_now(), limit, why, settings)
                # "completed": it ended in the moment of the cancel; a run like any other
            if end != "completed":
                raise MigrationError(f"source: {end} before its limit, not by the bench")
            if _migration_end(dst, "target", time.monotonic() + CANCEL_WAIT_S) != "completed":
                raise MigrationError(f"target: not completed {CANCEL_WAIT_S:g} s after "
                                     f"the source")
            seconds = time.monotonic() - started
            # both ways, as for DWCP (bench.frame_pipe)
            if relay is not None:
                relay.wait_drained(60)
            wire = wire_now()
        finally:
            if relay is not None:
                relay.close()
        info = src.proc.qmp.execute("query-migrate")
        # both paused now: their RAM files must be equal (outside the timed window)
        ram_differ, ram_first = differing_pages(src.proc.ram, dst.proc.ram)
        offset = dst.console.stat().st_size if dst.console.exists() else 0
        before = read_console([src.console]).last_heartbeat
        dst.proc.qmp.execute("cont")
        guest = _guest_ok([src.console, dst.console], [src_offset, offset], before,
                          dst.proc.alive)
        ram = info.get("ram", {})
        return {"converged": True, "limit_s": limit, "limit_why": why, "settings": settings,
                "wire_bytes": wire, "total_s": round(seconds, 3),
                "downtime_ms": info.get("downtime"), "qemu_total_time_ms": info.get("total-time"),
                "ram_transferred": ram.get("transferred"), "zero_pages": ram.get("duplicate"),
                "normal_pages": ram.get("normal"),
                "dirty_sync_count": ram.get("dirty-sync-count"),
                "cpu_throttle_percentage": info.get("cpu-throttle-percentage"),
                "ram_pages_differ": ram_differ, "ram_pages_differ_first": ram_first,
                "guest": guest}
    finally:
        for g in reversed(guests):
            g.close()
        if link is not None:
            link.close()


def _not_converged(src: _Guest, info: dict[str, Any], seconds: float, wire: int,
                   limit: float, why: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A contender cancelled at its limit: ``info`` (QEMU's ``query-migrate`` just before
    the cancel) and the wire bytes so far; the source must run on with its counter and
    checks intact (``guest``)."""
    status = src.proc.status()
    offset = src.console.stat().st_size
    before = read_console([src.console]).last_heartbeat
    guest = _guest_ok([src.console], [offset], before, src.proc.alive)
    guest["source_status"] = status
    if status != "running":
        guest["ok"] = False
    ram = info.get("ram", {})
    print(f"bench live: cancelled after {seconds:.1f} s (not converged), {wire} bytes on "
          f"the wire; the source {status}, its guest {'ok' if guest['ok'] else 'NOT ok'}",
          file=sys.stderr, flush=True)
    return {"converged": False, "limit_s": limit, "limit_why": why, "settings": settings,
            "wire_bytes": wire, "total_s": round(seconds, 3), "downtime_ms": None,
            "ram_transferred": ram.get("transferred"), "remaining_bytes": ram.get("remaining"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "dirty_pages_rate": ram.get("dirty-pages-rate"),
            "cpu_throttle_percentage": info.get("cpu-throttle-percentage"),
            "guest": guest}


#: Bytes compared at a time when a QEMU target's RAM is set against its source's.
_COMPARE_BYTES = 1 << 20


def differing_pages(a: Path, b: Path, limit: int = 16) -> tuple[int, list[int]]:
    """(how many 4 KiB pages of the RAM files ``a`` and ``b`` differ, the first ``limit``
    of them). After QEMU's migration completes both guests are paused (the source in
    ``postmigrate``, the target under ``-S``), so their RAM files must be equal: a page
    that differs is a page QEMU's migration did not deliver, told apart from a fault of
    the guest's self-check (docs/qemu.md, "QEMU precopy's failed check")."""
    count, first = 0, []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            raise ValueError(f"{a} and {b}: RAM files of different sizes")
        offset = 0
        while ca := fa.read(_COMPARE_BYTES):
            cb = fb.read(_COMPARE_BYTES)
            if ca != cb:
                for p in range(0, len(ca), PAGE_SIZE):
                    if ca[p : p + PAGE_SIZE] != cb[p : p + PAGE_SIZE]:
                        count += 1
                        if len(first) < limit:
                            first.append((offset + p) // PAGE_SIZE)
            offset += len(ca)
    return count, first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Pages sampled to choose DWCP's level: 8 chunks of 1 MiB of non-zero pages spread over
#: the guest's RAM (what bench.hde samples per candidate level).
LEVEL_SAMPLE_CHUNKS = 8


def _dwcp_level(backend: QemuBackend, bw_Bps: float, rtt_s: float) -> tuple[str, int]:
    """(link mode, zstd level) as the product picks them: the mode from the measured link
    (mesh.links.modes.classify with DESIGN's thresholds), the level by
    federation.dataplane.v3_protocol.choose_chunk_level on pages of the running guest."""
    live = backend.open_images("g")["memory"]
    try:
        zero = bytes(PAGE_SIZE)
        nonzero = [p for p in range(live.page_count) if live.view(p) != zero]
        step = max(CHUNK_PAGES, len(nonzero) // LEVEL_SAMPLE_CHUNKS)
        sample = [b"".join(bytes(live.view(p)) for p in nonzero[i : i + CHUNK_PAGES])
                  for i in range(0, len(nonzero), step)][:LEVEL_SAMPLE_CHUNKS]  # fmt: skip
    finally:
        live.close()
    mode = classify(ModeLimits(), rtt_s * 1000, bw_Bps * 8 / 1e6, 0.0)
    return choose_chunk_level(sample, mode.value, bw_Bps * 8 / 1e6, bw_Bps * 8 / 1e6)


def _wire_leg(src: QemuBackend, dst: QemuBackend, mid: str, epoch: int, level: int,
              carry: Carry, counted: Callable[[], int]) -> dict[str, Any]:  # fmt: skip
    """One migration of ``g`` from ``src`` to ``dst`` with every byte over ``carry``; its
    figures (bytes counted on the link) and whether the target kept counter and checks."""
    logs = [src.console_path("g"), dst.console_path("g")]
    offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
    before_bytes = counted()
    rep = LiveMigration(src, dst, "g", mid, level=level, carry=carry).run(epoch)
    wire = counted() - before_bytes
    before = read_console([logs[0]], [offsets[0]]).last_heartbeat
    guest = _guest_ok(logs, offsets, before, lambda: dst.qemu_pid("g") is not None)
    return {"wire_bytes": wire, "payload_bytes": rep.wire_bytes,
            "total_s": round(rep.total_s, 3), "downtime_ms": round(rep.downtime_s * 1000, 1),
            "stop_window_ms": {k: round(v * 1000, 1) for k, v in rep.stop_window.items()},
            "rounds": [attrs.asdict(r) for r in rep.rounds], "final_pages": rep.final_pages,
            "device_state_bytes": rep.device_state_bytes, "zstd_level": level,
            "guest": guest}  # fmt: skip


def _dwcp_run(setup: Setup, work: Path, tbf: bool, return_after_s: int) -> dict[str, Any]:
    """DWCP's live migration of the guest over the link (bench.frame_pipe: loopback through
    the counting relay, or the 100 Mbit/s veth pair): A -> B once the guest is ready at the
    level the product picks for the measured link; then, ``return_after_s`` seconds of
    guest time later, B -> A, where A still holds its earlier copy (the diff's base)."""
    link = TbfLink(100).open() if tbf else None
    a = QemuBackend(work / "a", accel=setup.accel)
    b = QemuBackend(work / "b", accel=setup.accel)
    pipe: FramePipe | None = None
    try:
        pipe = over_tbf(link, work / "pipe") if link is not None else loopback()
        a.create("g", setup.spec)
        a.start("g", 1)
        wait_console([a.console_path("g")], _ready(setup.at_s), BOOT_TIMEOUT,
                     f"the ballast and {setup.at_s} s of guest time",
                     alive=lambda: a.qemu_pid("g") is not None)
        bw, rtt = pipe.measure()
        mode, level = _dwcp_level(a, bw, rtt)
        out: dict[str, Any] = {
            "link_measured": {"Mbit_per_s": round(bw * 8 / 1e6, 1), "rtt_ms": round(rtt * 1000, 2)},
            "mode": mode, "zstd_level": level,
            "wire": ("every byte (diff both ways, chunks, device state, roots) over TCP: "
                     + ("the veth pair's tx counters, both ends" if tbf else
                        "through the counting relay, both ways"))}  # fmt: skip
        there = _wire_leg(a, b, "bench-there", 2, level, pipe.carry, pipe.counted)
        out.update(there)
        if return_after_s <= 0 or not there["guest"]["ok"]:
            return out
        at = read_console([b.console_path("g")]).last_heartbeat + _heartbeat_at(return_after_s)
        wait_console([b.console_path("g")], lambda c: c.last_heartbeat >= at, BOOT_TIMEOUT,
                     f"{return_after_s} s of guest time at the target",
                     alive=lambda: b.qemu_pid("g") is not None)
        out["back"] = _wire_leg(b, a, "bench-back", 3, level, pipe.reversed(), pipe.counted)
        out["return_after_s"] = return_after_s
        return out
    finally:
        a.close(stop_guests=True)
        b.close(stop_guests=True)
        if pipe is not None:
            pipe.close()
        if link is not None:
            link.close()


# --------------------------------------------------------------------------- the node path

#: The guest's home DC and the DC behind the measured link (``bench.netns.FarLink``: its
#: node runs in the far namespace; the three others, and this process, on the near side).
HOME, FAR = "dc1", "dc3"
VM = "guest"
#: How long the link is watched with the federation idle before the first leg: what the
#: mesh's own traffic (gossip, PBFT, link probes) puts on it, reported beside the figures.
IDLE_S = 5.0
#: A leg of a 256 MiB TCG guest at 100 Mbit/s on a shared 2-core machine: 30-120 s.
NODE_LEG_BUDGET = 600.0
#: The bench asks the near DC's API for the migration's state this often: 0.1 s is the
#: resolution of ``total_s`` (request to commit), and no API call crosses the link.
NODE_POLL = 0.1


#: What each leg reports of every round from the source's ``round_sent`` log: its pages
#: and bytes, where its time went (preparation, waiting for the target, the transfer) and
#: how full the link was while the chunks went (federation.dataplane.v3_source).
ROUND_KEYS = ("round", "pages", "wire_bytes", "seconds", "dirty_pages", "refresh_s", "index_s",
              "level_s", "ready_s", "go_wait_s", "transfer_s", "level", "level_start", "levels",
              "level_steps", "chunks", "chunk_bytes", "first_chunk_s", "wire_MBps", "encode_s",
              "starved_s", "fenced", "sketched_ahead", "sketched_late", "pushed", "streamed",
              "grouped_pages", "group_s")


def _round_figures(event: dict[str, Any], rate_mbit: float | None) -> dict[str, Any]:
    """A round's figures from its ``round_sent`` line; on a shaped link also
    ``link_use``: the round's bytes over its transfer time as a share of the link's rate
    (1.0: the wire was full from the target's word to its verdict)."""
    out = {k: event[k] for k in ROUND_KEYS if k in event}
    if rate_mbit and "wire_MBps" in event:
        out["link_use"] = round(float(event["wire_MBps"]) * 8 / rate_mbit, 3)
    return out


def _node_run(setup: Setup, assets: GuestAssets, work: Path, tbf: bool,
              return_after_s: int) -> dict[str, Any]:
    """DWCP's own path: four ``dwcp node`` processes (the federation's ledger, v3 rounds
    over AMST, the qemu backend: what ``dwcp demo-qemu`` runs), :data:`FAR` behind a veth
    pair (unshaped for loopback, tbf at 100 Mbit/s for tbf100) so every byte between it
    and the others crosses the pair, counted by both ends' tx counters. The guest is
    created at :data:`HOME` through its API, migrated to :data:`FAR` once ready and,
    ``return_after_s`` seconds of guest time later, back to :data:`HOME`, which still
    holds its earlier copy."""
    link = FarLink(100 if tbf else None).open()
    directory = Path(tempfile.mkdtemp(prefix="dwcp-bench-live-fed-"))
    ram = work / "ram"
    try:
        fed = LocalFederation(directory, 4, host=link.near, hosts={FAR: link.far},
                              prefixes={FAR: link.far_prefix()})
        images = directory / "images"
        write_qemu_configs(fed, directory, images, ram, assets, setup.accel)
        return trio.run(_node_scenario, fed, directory, ram, setup, assets, link,
                        return_after_s)
    finally:
        power_off_guests(directory, ram, VM)
        link.close()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(ram, ignore_errors=True)


def _console(directory: Path, dc: str) -> Path:
    return directory / "data" / dc / "qemu" / VM / "console.log"


async def _node_scenario(fed: LocalFederation, directory: Path, ram: Path, setup: Setup,
                         assets: GuestAssets, link: FarLink,
                         return_after_s: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        try:
            demo = Demo(fed, directory, DemoFailed)
            t0 = trio.current_time()
            await fed.start_all(nursery)
            await fed.wait_full_mesh(t0 + 4 * START_BUDGET)
            await demo.wait_ready(t0 + 4 * START_BUDGET)
            await demo.post(HOME, "/api/policy", SetPolicy(100, (), (), False))
            await create_guest(demo, HOME, directory / "images", assets,
                               setup.spec.memory_mib, setup.spec.append, 0, VM)
            home = _console(directory, HOME)
            await trio.to_thread.run_sync(
                lambda: wait_console([home], _ready(setup.at_s), BOOT_TIMEOUT,
                                     f"the ballast and {setup.at_s} s of guest time",
                                     alive=lambda: running_at(directory, ram, HOME, VM)
                                     is not None))
            before = link.tx_bytes()
            await trio.sleep(IDLE_S)
            idle = (link.tx_bytes() - before) / IDLE_S
            out.update(
                path="dwcp node processes: ledger (PBFT), v3 rounds (HDE over AMST), qemu "
                     f"backend; {FAR} behind a veth pair "
                     + ("shaped to 100 Mbit/s by tbf" if link.rate_mbit else "(unshaped)"),
                wire="the veth pair's tx counters, both ends: every byte between "
                     f"{FAR} and the other DCs (IP packets with headers)",
                link_idle_bytes_per_s=round(idle))
            there = await _node_leg(demo, fed, directory, ram, link, HOME, FAR)
            out.update(there)
            if return_after_s > 0 and there["guest"]["ok"]:
                far = _console(directory, FAR)
                at = read_console([far]).last_heartbeat + _heartbeat_at(return_after_s)
                await trio.to_thread.run_sync(
                    lambda: wait_console([far], lambda c: c.last_heartbeat >= at,
                                         BOOT_TIMEOUT,
                                         f"{return_after_s} s of guest time at {FAR}",
                                         alive=lambda: running_at(directory, ram, FAR, VM)
                                         is not None))
                out["back"] = await _node_leg(demo, fed, directory, ram, link, FAR, HOME)
                out["return_after_s"] = return_after_s
            await fed.stop_all(trio.current_time() + 30)
        finally:
            fed.kill_all()
    return out


async def _node_leg(demo: Demo, fed: LocalFederation, directory: Path, ram: Path,
                    link: FarLink, src: str, dst: str) -> dict[str, Any]:
    """One migration of the guest from ``src`` to ``dst`` through the nodes: the link's
    bytes while it ran, request to commit, the downtime the target measured, the level
    the source chose, and whether the guest kept its counter and checks with one QEMU."""
    logs = [_console(directory, src), _console(directory, dst)]
    offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
    before_bytes = link.tx_bytes()
    doc = await demo.migrate(VM, src, dst, NODE_LEG_BUDGET, show=False, watch=HOME,
                             poll=NODE_POLL)
    wire = link.tx_bytes() - before_bytes
    mid = doc["id"]
    # the source's own figures (logical bytes, its count of wire bytes, rounds)
    figures = await demo.get(src, f"/api/migrations/{mid}")
    figures["elapsed"] = doc["elapsed"]
    leg = await leg_report(demo, figures, src, dst, show=False)
    sent = [e for e in fed.nodes[src].events
            if e["event"] == "round_sent" and e.get("migration_id") == mid]
    levels = sorted({int(e["level"]) for e in sent if "level" in e})
    if not levels:
        raise DemoFailed(f"{src} logged no v3 round with a level for {mid}")
    # the level of the round that sent the most (round 1 of a cold trip): QEMU's third
    # contender runs at it; the level moves chunk by chunk (mesh.hde.level.LevelGovernor)
    main_level = int(max((e for e in sent if "level" in e),
                         key=lambda e: int(e.get("chunk_bytes", 0)))["level"])
    before = read_console([logs[0]], [offsets[0]]).last_heartbeat
    guest = await trio.to_thread.run_sync(
        _guest_ok, logs, offsets, before,
        lambda: running_at(directory, ram, dst, VM) is not None)
    copies = [dc for dc in fed.nodes if running_at(directory, ram, dc, VM) is not None]
    guest["qemu_copies"] = copies
    if copies != [dst]:
        guest["ok"] = False
    # the round policy's decision after each round
    decisions = [e["detail"] for e in fed.nodes[src].events
                 if e["event"] == "notify" and e.get("kind") == "migration.precopy"
                 and isinstance(e.get("detail"), dict)
                 and e["detail"].get("migration_id") == mid]
    # what the source measured of this stop window (the next migration's reserve)
    costs = next((e["detail"] for e in fed.nodes[src].events
                  if e["event"] == "notify" and e.get("kind") == "migration.stop-costs"
                  and isinstance(e.get("detail"), dict)
                  and e["detail"].get("migration_id") == mid), None)
    return {"precopy": decisions, "stop_costs": costs,
            "wire_bytes": wire, "node_wire_bytes": leg["wire"],
            "logical_bytes": leg["bytes"], "total_s": round(leg["time"], 3),
            "downtime_ms": round(float(leg["downtime_ms"]), 1), "rounds": leg["rounds"],
            # the target's phases of the stop window, and both nodes' log marks in it
            "stop_window_ms": leg["stop_window_ms"], "stop_timeline": leg["stop_timeline"],
            "start_split_ms": leg["start_split_ms"],
            "zstd_level": main_level, "zstd_levels": levels,
            "mode": next((e.get("mode") for e in sent if e.get("mode")), None),
            "round_figures": [_round_figures(e, link.rate_mbit) for e in sent],
            "migration_id": mid, "guest": guest}


def _dirty_tracking(setup: Setup, work: Path) -> dict[str, Any]:
    """The two ways to find the pages a running guest changed, on the booted guest:
    rescanning digests (per page, and per 16 KiB group as SentDigests does) and the
    kernel's soft-dirty bits (probed; measured only where the kernel has them)."""
    a = QemuBackend(work / "a", accel=setup.accel)
    try:
        a.create("g", setup.spec)
        a.start("g", 1)
        con = wait_console([a.console_path("g")], _ready(setup.at_s), BOOT_TIMEOUT,
                           f"the ballast and {setup.at_s} s of guest time",
                           alive=lambda: a.qemu_pid("g") is not None)
        at = con.last_heartbeat
        live = a.open_images("g")["memory"]
        try:
            pages = live.page_count
            zero = bytes(PAGE_SIZE)
            zero_pages = sum(1 for p in range(pages) if live.view(p) == zero)
            t = time.monotonic()
            scan_digests(live)
            per_page_s = time.monotonic() - t
            shadow = ImageWriter(bytearray(live.view(0, pages)), "shadow")
            sent = SentDigests(shadow)
            wait_console([a.console_path("g")], lambda c: c.last_heartbeat >= at + 10, 60.0,
                         "1 s more of guest time")
            t = time.monotonic()
            changed = sent.changed(live)
            group_s = time.monotonic() - t
        finally:
            live.close()
        mib = pages * PAGE_SIZE / (1 << 20)
        return {"guest_mib": round(mib), "zero_page_percent": round(100 * zero_pages / pages, 1),
                "rescan_per_page_ms": round(per_page_s * 1000, 1),
                "rescan_grouped_ms": round(group_s * 1000, 1),
                "changed_pages_in_1s_guest_time": len(changed),
                "soft_dirty": soft_dirty_available() or "available (not measured by this run)"}
    finally:
        a.close(stop_guests=True)


#: QEMU's contenders by name (``--only``); the last runs at DWCP's level.
QEMU_CONTENDERS = ("qemu_precopy", "qemu_multifd_zstd1", "qemu_multifd_dwcp_level")


def _qemu_contenders(level: int) -> dict[str, Callable[[Setup, Path, bool], dict[str, Any]]]:
    """QEMU's contenders, the last at ``level`` (DWCP's choice on the link, or --level)."""
    out: dict[str, Callable[[Setup, Path, bool], dict[str, Any]]] = {
        "qemu_precopy": lambda s, w, t: _qemu_run(s, w, False, 0, t),
        "qemu_multifd_zstd1": lambda s, w, t: _qemu_run(s, w, True, 1, t),
    }
    if level != 1 and level >= 0:  # QEMU's multifd-zstd-level is 1..20; 0: no compression
        out["qemu_multifd_dwcp_level"] = lambda s, w, t: _qemu_run(s, w, True, level, t)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 4)


def compare(result: dict[str, Any], link: str) -> dict[str, Any]:
    """DWCP against the best QEMU on ``link``: fewest bytes, shortest time, shortest
    downtime, each of whichever QEMU contender did best at it. A contender that did not
    converge within its limit is left out (``qemu_left_out`` says which and why): it
    moved no guest, so its bytes and time are no migration's."""
    runs = {k.removesuffix(f"_{link}"): v for k, v in result.items()
            if k.startswith("qemu_") and k.endswith(f"_{link}") and isinstance(v, dict)}
    qemu = {k: v for k, v in runs.items() if v.get("converged", True)}
    dwcp = result.get(f"dwcp_{link}")
    out: dict[str, Any] = {}
    left_out = {k: f"not converged within its limit of {v['limit_s']:g} s "
                   f"({v['limit_why']}): cancelled after {v['total_s']:g} s, "
                   f"{v['wire_bytes']} bytes on the wire"
                for k, v in runs.items() if k not in qemu}  # fmt: skip
    if left_out:
        out["qemu_left_out"] = left_out
        for k, why in left_out.items():
            print(f"bench live: {k} on {link} is not the best QEMU: {why}", file=sys.stderr,
                  flush=True)
    if qemu:
        fewest = min(qemu, key=lambda k: qemu[k]["wire_bytes"])
        fastest = min(qemu, key=lambda k: qemu[k]["total_s"])
        out.update(qemu_wire_bytes=qemu[fewest]["wire_bytes"], qemu_fewest_bytes=fewest,
                   qemu_total_s=qemu[fastest]["total_s"], qemu_fastest=fastest,
                   qemu_downtime_ms=min((v["downtime_ms"] for v in qemu.values()
                                         if v["downtime_ms"] is not None), default=None))
    if dwcp is not None and "wire_bytes" in dwcp:
        out.update(dwcp_wire_bytes=dwcp["wire_bytes"], dwcp_total_s=dwcp["total_s"],
                   dwcp_downtime_ms=dwcp["downtime_ms"], dwcp_zstd_level=dwcp["zstd_level"])
        if qemu:
            out.update(cold_bytes_ratio=_ratio(dwcp["wire_bytes"], out["qemu_wire_bytes"]),
                       time_ratio=_ratio(dwcp["total_s"], out["qemu_total_s"]))
            back = dwcp.get("back")
            if back is not None:
                # QEMU holds no copy at the first host: a return sends everything again,
                # as its one-way run on this link did
                out.update(return_bytes_ratio=_ratio(back["wire_bytes"], out["qemu_wire_bytes"]),
                           return_time_ratio=_ratio(back["total_s"], out["qemu_total_s"]),
                           return_bytes_ratio_vs_there=_ratio(back["wire_bytes"],
                                                              dwcp["wire_bytes"]))  # fmt: skip
    return out


def measure(mib: int = GUEST_MIB, fill: int = FILL_PERCENT, at_s: int = AT_S,
            level: int = SECOND_LEVEL, tbf: bool = True, dwcp: bool = True,
            return_after_s: int = RETURN_AFTER_S, only: Sequence[str] = (),
            inproc: bool = False, loopback: bool = True,
            qemu_auto_converge: bool = True) -> dict[str, Any]:
    """Per link (loopback, then with ``tbf`` the 100 Mbit/s veth pair): DWCP's migration
    through ``dwcp node`` processes first (its level, chosen by the source node for the
    link, is QEMU's third level), with ``inproc`` also the in-process ``LiveMigration``
    (``dwcp_inproc_<link>``), then QEMU's contenders. ``level``: QEMU's third level when
    DWCP does not run. ``only``: run just these contenders (``dwcp``, ``dwcp_inproc`` and
    the names of :data:`QEMU_CONTENDERS`), e.g. to reproduce one run's failure without the
    others. ``loopback`` False: the tbf link only (with ``tbf``)."""
    unknown = sorted(set(only) - {"dwcp", "dwcp_inproc", *QEMU_CONTENDERS})
    if unknown:
        raise ValueError(f"--only: unknown contender {unknown[0]!r} (one of dwcp, "
                         f"dwcp_inproc, {', '.join(QEMU_CONTENDERS)})")
    if only:
        inproc = (dwcp and inproc) or "dwcp_inproc" in only
        dwcp = dwcp and "dwcp" in only
    result: dict[str, Any] = {"bench": "live", "missing": []}
    if shutil.which(QEMU) is None:
        result["missing"].append(f"no {QEMU} (make qemu-guest installs it)")
        return result
    try:
        assets = load_assets()
    except GuestAssetsMissing as exc:
        result["missing"].append(str(exc))
        return result
    spec = VmSpec(str(assets.kernel), str(assets.initrd), mib, guest_cmdline(fill, False))
    work = Path(tempfile.mkdtemp(prefix="dwcp-bench-live-", dir="/dev/shm"))
    try:
        accel = probe_accel(QEMU, spec.kernel, spec.initrd, work / "probe")
        setup = Setup(spec, accel, at_s, level, qemu_auto_converge)
        result.update(qemu_version=qemu_version(), kvm=accel == "kvm", guest_mib=mib,
                      fill_percent=fill, at_s=at_s)
        links = ["loopback"] if loopback or not tbf else []
        netns = netns_missing()
        why = netns if tbf else "not asked (--no-tbf)"
        if why is None:
            links.append("tbf100")
        else:
            result["missing"].append(f"tbf100: {why}")
        if dwcp and netns is not None:
            result["missing"].append(f"dwcp: the node path puts {FAR} behind a veth pair in "
                                     f"a network namespace: {netns}")
        for link in links:
            third = level
            if inproc:
                run = _dwcp_run(setup, work / f"inproc-{link}", link == "tbf100",
                                return_after_s)
                result[f"dwcp_inproc_{link}"] = run
                third = run["zstd_level"]
            if dwcp and netns is None:
                run = _node_run(setup, assets, work / f"dwcp-{link}", link == "tbf100",
                                return_after_s)
                result[f"dwcp_{link}"] = run
                third = run["zstd_level"]
            if (dwcp or inproc) and third < 0:
                result["missing"].append(f"qemu_multifd_dwcp_level_{link}: DWCP chose zstd "
                                         f"level {third}; QEMU's multifd-zstd-level is 1..20")
            for name, contender in _qemu_contenders(third).items():
                if only and name not in only:
                    continue
                result[f"{name}_{link}"] = contender(setup, work / f"{name}-{link}",
                                                     link == "tbf100")
                if name == "qemu_multifd_dwcp_level":
                    result[f"{name}_{link}"]["zstd_level"] = third
        if dwcp or inproc:
            result["dirty_tracking"] = _dirty_tracking(setup, work / "dirty")
        result["comparison"] = {link: compare(result, link) for link in links}
        loop = result["comparison"].get("loopback", {})
        # bytes matter where the link is the bottleneck: the 100 Mbit/s figures when they
        # were measured (on loopback the level picker rightly trades bytes for time)
        bytes_link = "tbf100" if "tbf100" in links else "loopback"
        by = result["comparison"].get(bytes_link, {})
        result.update(bytes_link=bytes_link,
                      qemu_wire_bytes=by.get("qemu_wire_bytes"),
                      dwcp_wire_bytes=by.get("dwcp_wire_bytes"),
                      cold_bytes_ratio=by.get("cold_bytes_ratio"),
                      return_bytes_ratio=by.get("return_bytes_ratio"),
                      return_time_ratio=by.get("return_time_ratio"),
                      qemu_total_s=loop.get("qemu_total_s"), dwcp_total_s=loop.get("dwcp_total_s"),
                      qemu_downtime_ms=loop.get("qemu_downtime_ms"),
                      dwcp_downtime_ms=loop.get("dwcp_downtime_ms"),
                      tbf100_time_ratio=result["comparison"].get("tbf100", {}).get("time_ratio"))
        runs = [v for v in result.values() if isinstance(v, dict) and "guest" in v]
        runs += [result[f"{kind}_{link}"]["back"] for link in links
                 for kind in ("dwcp", "dwcp_inproc")
                 if "back" in result.get(f"{kind}_{link}", {})]  # fmt: skip
        result["guests_ok"] = all(r["guest"]["ok"] for r in runs)
        # QEMU runs whose target RAM differed from the paused source's: pages QEMU's own
        # migration lost, whether or not the guest's checks happened to read them
        # (seen with precopy under TCG on a loaded host: docs/BENCHMARKS.md)
        result["qemu_ram_pages_differ"] = {
            k: v["ram_pages_differ"] for k, v in result.items()
            if k.startswith("qemu_") and isinstance(v, dict) and v.get("ram_pages_differ")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("live", help="live migration of the self-checking guest: QEMU's own "
                                    "beside DWCP's, loopback and 100 Mbit/s tbf")
    p.add_argument("--json", action="store_true", help="one JSON object on one line")
    p.add_argument("--mib", type=int, default=GUEST_MIB, help="guest RAM in MiB")
    p.add_argument("--fill", type=int, default=FILL_PERCENT,
                   help="percent of the guest's free RAM in ballast")
    p.add_argument("--at", type=int, default=AT_S, help="migrate at this guest time (s)")
    p.add_argument("--level", type=int, default=SECOND_LEVEL,
                   help="QEMU's third multifd-zstd level with --no-dwcp (otherwise DWCP's "
                        "chosen level on each link)")
    p.add_argument("--no-tbf", action="store_true", help="loopback only")
    p.add_argument("--no-dwcp", action="store_true", help="QEMU's contenders only")
    p.add_argument("--qemu-no-auto-converge", action="store_true",
                   help="QEMU's contenders without auto-converge (plain pre-copy of a busy "
                        "guest may then not converge: it is cancelled at its limit)")
    p.add_argument("--no-loopback", action="store_true",
                   help="the 100 Mbit/s tbf link only (the loopback runs are skipped)")
    p.add_argument("--legs", action="append", default=[], choices=list(LEGS),
                   metavar="LEG",
                   help="run only these links (repeatable): loopback, tbf (the 100 Mbit/s "
                        "veth pair); default both (--no-tbf, --no-loopback say the same)")
    p.add_argument("--return-after", type=int, default=RETURN_AFTER_S,
                   help="DWCP migrates back after this guest time at the target (s; "
                        "0: no return trip)")
    p.add_argument("--inproc", action="store_true",
                   help="also DWCP's in-process LiveMigration (dwcp_inproc_<link>: two qemu "
                        "backends in this process, every byte over the link)")
    p.add_argument("--only", action="append", default=[], metavar="CONTENDER",
                   choices=["dwcp", "dwcp_inproc", *QEMU_CONTENDERS],
                   help="run only this contender (repeatable): dwcp (the node path), "
                        "dwcp_inproc, qemu_precopy, qemu_multifd_zstd1, "
                        "qemu_multifd_dwcp_level (--level without dwcp)")
    p.set_defaults(func=_main)


#: The links ``--legs`` names: the unshaped one, and the veth pair shaped to 100 Mbit/s
LEGS = ("loopback", "tbf")


def _main(args: argparse.Namespace) -> int:
    legs = set(args.legs or LEGS)
    tbf = "tbf" in legs and not args.no_tbf
    loopback = "loopback" in legs and not args.no_loopback
    if not (tbf or loopback):
        raise SystemExit("dwcp bench live: --legs, --no-tbf and --no-loopback leave no link")
    r = measure(args.mib, args.fill, args.at, args.level, tbf, not args.no_dwcp,
                args.return_after, args.only, args.inproc, loopback,
                not args.qemu_no_auto_converge)
    print(json.dumps(r) if args.json else json.dumps(r, indent=1))
    return 0 if not r["missing"] or "guests_ok" in r else 1
