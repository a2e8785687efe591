"""QEMU's own live migration, the baseline DWCP's figures are compared against.

``measure_qemu_multifd_zstd`` migrates the corpus guest (docs/CORPUS.md) from a
source QEMU to a target QEMU started with ``-incoming``, with multifd and zstd,
through ``CountingRelay`` on loopback: the bytes QEMU put on the wire, the time,
and QEMU's own statistics. ``measure_qemu_tbf`` does the same between two network
namespaces joined by a 100 Mbit/s tbf link (``tbf100_qemu_s``); ``measure_raw_tbf``
times a raw copy of the RAM image over that link (``tbf100_raw_s``).

Two sources of the guest:

- ``live`` (the default): booted exactly as ``make corpus`` boots it, workload
  running, migrated at t0 + ``at_s`` seconds while it keeps running (dirty pages
  are re-sent);
- ``snapshot``: a QEMU started paused (``-S``) on a copy of the corpus snapshot file,
  so QEMU sends exactly the RAM image that DWCP's HDE benchmark encodes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.corpus.build import ram_dir
from bench.corpus.guest import QEMU, GuestSpec, RunningGuest, copy_sparse
from bench.corpus.relay import CountingRelay
from bench.netns import ADDRESS_B, TbfLink, time_raw_copy
from federation.demo.corpus import Manifest, load_manifest

# QEMU's default max-bandwidth is 128 MiB/s (MAX_THROTTLE, migration/migration.c);
# the baseline must not be throttled below what the link carries, so: 1 TiB/s.
MAX_BANDWIDTH = 1 << 40
# multifd-channels default is 2 (migration/migration.c DEFAULT_MIGRATE_MULTIFD_CHANNELS)
# and multifd-zstd-level default is 1 (DEFAULT_MIGRATE_MULTIFD_ZSTD_LEVEL).
CHANNELS = 2
ZSTD_LEVEL = 1
# A 1 GiB guest at 100 Mbit/s takes ~90 s raw; 1800 s fails a migration that never
# converges instead of hanging the benchmark.
MIGRATION_TIMEOUT_S = 1800.0
TARGET_PORT = 4444  # QEMU's documentation examples use tcp:...:4444 for -incoming


class MigrationError(Exception):
    """QEMU's migration failed, was cancelled, or did not complete in time."""


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def guest_spec(manifest: Manifest, guest_mib: int, workload: str) -> GuestSpec:
    info = manifest.info
    return GuestSpec(manifest.root / info["kernel"]["file"], manifest.root / info["initramfs"],
                     guest_mib, workload)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _configure(guest: RunningGuest, source: bool, channels: int, level: int) -> None:
    caps = [{"capability": "multifd", "state": True}, {"capability": "events", "state": True}]
    guest.qmp.execute("migrate-set-capabilities", capabilities=caps)
    params: dict[str, Any] = {"multifd-channels": channels, "multifd-compression": "zstd"}
    if source:
        params.update({"multifd-zstd-level": level, "max-bandwidth": MAX_BANDWIDTH})
    guest.qmp.execute("migrate-set-parameters", **params)


class _Pair:
    """A source and a target QEMU of one guest, in a scratch directory."""

    def __init__(
        self, manifest: Manifest, spec: GuestSpec, mode: str, at_s: int,
        src_prefix: Sequence[str] = (), dst_prefix: Sequence[str] = (),
    ) -> None:  # fmt: skip
        if mode not in ("live", "snapshot"):
            raise ValueError(f"mode: expected 'live' or 'snapshot', got {mode!r}")
        self.work = Path(tempfile.mkdtemp(prefix="migrate-", dir=ram_dir()))
        self.mode = mode
        self.snapshot: Path | None = None
        self.src_mem = self.work / "src-mem"
        self.source: RunningGuest | None = None
        self.target: RunningGuest | None = None
        try:
            if mode == "snapshot":
                self.snapshot = manifest.ram(spec.mib, spec.workload, at_s)
                copy_sparse(self.snapshot, self.src_mem)
            self.source = RunningGuest(
                spec, self.work / "src", self.src_mem, self.work / "src-serial.log",
                prefix=src_prefix, extra=["-S"] if mode == "snapshot" else [],
            )  # fmt: skip
            self.target = RunningGuest(
                spec, self.work / "dst", None, self.work / "dst-serial.log",
                prefix=dst_prefix, incoming="defer",
            )  # fmt: skip
            if mode == "live":
                self.source.wait_t0()
                self.source.wait_running(at_s)
        except BaseException:
            self.close()
            raise

    def migrate(self, dst_uri: str, src_uri: str, channels: int, level: int) -> dict[str, Any]:
        assert self.source is not None and self.target is not None
        _configure(self.source, True, channels, level)
        _configure(self.target, False, channels, level)
        self.target.qmp.execute("migrate-incoming", uri=dst_uri)
        started = time.monotonic()
        self.source.qmp.execute("migrate", uri=src_uri)
        try:
            self.source.qmp.wait_event("MIGRATION", MIGRATION_TIMEOUT_S, status="completed")
        except Exception as e:
            info = self.source.qmp.execute("query-migrate")
            raise MigrationError(f"{info.get('status')}: {info.get('error-desc', e)}") from e
        source_seconds = time.monotonic() - started
        # the target finishes loading the last pages after the source reports completion
        self.target.qmp.wait_event("MIGRATION", MIGRATION_TIMEOUT_S, status="completed")
        seconds = time.monotonic() - started
        info = self.source.qmp.execute("query-migrate")
        target_status = self.target.qmp.execute("query-migrate").get("status")
        if info.get("status") != "completed" or target_status != "completed":
            raise MigrationError(f"source {info.get('status')}, target {target_status}")
        ram = info.get("ram", {})
        return {
            "mode": self.mode,
            "seconds": round(seconds, 3),
            "source_seconds": round(source_seconds, 3),
            "qemu_total_time_ms": info.get("total-time"),
            "qemu_downtime_ms": info.get("downtime"),
            "qemu_ram_transferred": ram.get("transferred"),
            "qemu_ram_total": ram.get("total"),
            "qemu_zero_pages": ram.get("duplicate"),
            "qemu_normal_pages": ram.get("normal"),
            "qemu_multifd_bytes": ram.get("multifd-bytes"),
            "qemu_dirty_sync_count": ram.get("dirty-sync-count"),
            "target_status": target_status,
        }

    def source_unchanged(self) -> bool | None:
        """Snapshot mode: is the source's RAM still byte-identical to the snapshot?"""
        if self.snapshot is None:
            return None
        return filecmp.cmp(self.snapshot, self.src_mem, shallow=False)

    def close(self) -> None:
        for guest in (self.source, self.target):
            if guest is not None:
                guest.close()
        shutil.rmtree(self.work, ignore_errors=True)


def measure_qemu_multifd_zstd(
    guest_mib: int = 1024, workload: str = "A", at_s: int = 60, mode: str = "live",
    channels: int = CHANNELS, level: int = ZSTD_LEVEL, corpus: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """QEMU multifd+zstd migration on loopback through a byte-counting relay.

    ``wire_bytes`` is every byte the source sent towards the target (all channels).
    """
    manifest = load_manifest(corpus)
    spec = guest_spec(manifest, guest_mib, workload)
    pair = _Pair(manifest, spec, mode, at_s)
    try:
        port = _free_port()
        with CountingRelay(("127.0.0.1", port)) as relay:
            host, rport = relay.address
            result = pair.migrate(f"tcp:127.0.0.1:{port}", f"tcp:{host}:{rport}", channels, level)
            if not relay.wait_drained(60):
                raise MigrationError("relay: a migration connection stayed open after completion")
            if relay.errors:
                raise MigrationError(f"relay: {relay.errors}")
            result.update(wire_bytes=relay.forward_bytes, wire_bytes_back=relay.backward_bytes,
                          connections=relay.connections)  # fmt: skip
        result["source_ram_unchanged"] = pair.source_unchanged()
    finally:
        pair.close()
    result.update(qemu_version=qemu_version(), guest_mib=guest_mib, workload=workload,
                  at_s=at_s, channels=channels, zstd_level=level)  # fmt: skip
    return result


def measure_qemu_tbf(
    rate_mbit: int = 100, guest_mib: int = 1024, workload: str = "A", at_s: int = 60,
    mode: str = "live", corpus: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """QEMU multifd+zstd migration from namespace a to b over tbf (``tbf100_qemu_s``)."""
    manifest = load_manifest(corpus)
    spec = guest_spec(manifest, guest_mib, workload)
    with TbfLink(rate_mbit) as link:
        pair = _Pair(manifest, spec, mode, at_s, link.exec_prefix("a"), link.exec_prefix("b"))
        try:
            sent_before = link.tx_bytes("a")
            uri = f"tcp:{ADDRESS_B}:{TARGET_PORT}"
            result = pair.migrate(uri, uri, CHANNELS, ZSTD_LEVEL)
            result["veth_tx_bytes"] = link.tx_bytes("a") - sent_before
        finally:
            pair.close()
    result.update(qemu_version=qemu_version(), rate_mbit=rate_mbit, guest_mib=guest_mib,
                  workload=workload, at_s=at_s)  # fmt: skip
    return result


def measure_raw_tbf(
    rate_mbit: int = 100, guest_mib: int = 1024, workload: str = "A", at_s: int = 60,
    corpus: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One plain TCP stream carrying the whole RAM image over tbf (``tbf100_raw_s``)."""
    manifest = load_manifest(corpus)
    image = manifest.ram(guest_mib, workload, at_s)
    with TbfLink(rate_mbit) as link:
        result = time_raw_copy(link, image)
    result.update(rate_mbit=rate_mbit, image=str(image))
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.qemu loopback|tbf|raw``: print one measurement as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.qemu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("what", choices=["loopback", "tbf", "raw"])
    p.add_argument("--mib", type=int, default=1024, help="guest RAM (1024, or 256 for small)")
    p.add_argument("--workload", default="A")
    p.add_argument("--at", type=int, default=60, help="snapshot offset from t0, seconds")
    p.add_argument("--mode", choices=["live", "snapshot"], default="live")
    p.add_argument("--rate-mbit", type=int, default=100)
    a = p.parse_args(argv)
    if a.what == "loopback":
        r = measure_qemu_multifd_zstd(a.mib, a.workload, a.at, a.mode)
    elif a.what == "tbf":
        r = measure_qemu_tbf(a.rate_mbit, a.mib, a.workload, a.at, a.mode)
    else:
        r = measure_raw_tbf(a.rate_mbit, a.mib, a.workload, a.at)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
