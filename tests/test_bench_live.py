"""``dwcp bench live``: says what it could not run; DWCP's in-process migration of the
booted self-checking guest over the bench's real paths (loopback through the counting
relay and the 100 Mbit/s veth pair), every byte on the wire, the target using only what
arrived; the comparison's arithmetic; the whole bench (slow: many boots), whose DWCP
contender is the node path (dwcp node processes, dc3 behind the link)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import live
from bench.frame_pipe import FramePipe, loopback, over_tbf
from bench.netns import TbfLink, netns_missing
from federation.demo.qemu_guest.build import guest_cmdline, load_assets
from federation.demo.qemu_guest.console import wait_console
from federation.vms.live_migration import LiveMigration
from federation.vms.qemu_spec import VmSpec
from tests.harness.qemu import QemuLab, qemu_lab, qemu_missing

_NETNS = netns_missing()


def test_without_the_guest_it_names_what_is_missing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_GUEST", str(tmp_path / "nothing"))
    r = live.measure(tbf=False)
    assert r["missing"] and ("make qemu-guest" in r["missing"][0])
    assert "guests_ok" not in r


def test_only_names_a_contender_it_knows() -> None:
    with pytest.raises(ValueError, match="unknown contender 'qemu_postcopy'"):
        live.measure(tbf=False, only=["qemu_precopy", "qemu_postcopy"])


@pytest.mark.parametrize(("argv", "links"), [
    ([], (True, True)), (["--legs", "tbf"], (True, False)),
    (["--legs", "loopback"], (False, True)), (["--legs", "tbf", "--legs", "loopback"],
                                              (True, True)),
    (["--legs", "tbf", "--no-tbf"], None), (["--no-loopback"], (True, False))])
def test_legs_choose_the_links(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                               links: tuple[bool, bool] | None) -> None:
    """``--legs`` picks the links measure() runs: (tbf, loopback)."""
    import argparse

    seen: list[tuple[bool, bool]] = []

    def fake(*a: object) -> dict[str, object]:
        seen.append((bool(a[4]), bool(a[9])))
        return {"missing": [], "guests_ok": True}

    monkeypatch.setattr(live, "measure", fake)
    parser = argparse.ArgumentParser()
    live.register(parser.add_subparsers())
    args = parser.parse_args(["live", "--json", *argv])
    if links is None:
        with pytest.raises(SystemExit, match="leave no link"):
            args.func(args)
        return
    assert args.func(args) == 0 and seen == [links]


def test_differing_pages_finds_each_page_a_migration_did_not_deliver(tmp_path: Path) -> None:
    pages = 600  # more than one compared piece (256 pages), and a partial last one
    data = bytearray(os.urandom(pages * 4096))
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "dst").write_bytes(data)
    assert live.differing_pages(tmp_path / "src", tmp_path / "dst") == (0, [])
    for p in (0, 255, 256, 599):
        data[p * 4096 + 4095] ^= 1  # one bit of the page's last byte
    (tmp_path / "dst").write_bytes(data)
    assert live.differing_pages(tmp_path / "src", tmp_path / "dst") == (4, [0, 255, 256, 599])
    assert live.differing_pages(tmp_path / "src", tmp_path / "dst", limit=2) == (4, [0, 255])
    (tmp_path / "dst").write_bytes(data[:4096])
    with pytest.raises(ValueError, match="different sizes"):
        live.differing_pages(tmp_path / "src", tmp_path / "dst")


def test_the_loopback_pipe_carries_frames_both_ways_and_counts_them() -> None:
    pipe = loopback()
    try:
        frames = [os.urandom(n) for n in (0, 1, 4096, 1 << 20)]
        assert pipe.carry(iter(frames), True) == frames
        assert pipe.carry([b"back"], False) == [b"back"]
        # every byte crossed the relay, with a 4-byte length per frame
        assert pipe.counted() == sum(len(f) + 4 for f in frames) + 4 + 4
        bw, rtt = pipe.measure(2 << 20)
        assert bw > 0 and rtt > 0
    finally:
        pipe.close()


def test_compare_takes_each_figure_from_the_best_qemu_and_the_return_trip() -> None:
    result = {
        "qemu_precopy_tbf100": {"wire_bytes": 300, "total_s": 30.0, "downtime_ms": 40},
        "qemu_multifd_zstd1_tbf100": {"wire_bytes": 100, "total_s": 12.0, "downtime_ms": 90},
        "qemu_multifd_zstd1_loopback": {"wire_bytes": 1, "total_s": 1.0, "downtime_ms": 1},
        "dwcp_tbf100": {"wire_bytes": 60, "total_s": 6.0, "downtime_ms": 250.0,
                        "zstd_level": 9, "back": {"wire_bytes": 5, "total_s": 3.0}},
    }
    c = live.compare(result, "tbf100")
    assert c["qemu_fewest_bytes"] == "qemu_multifd_zstd1" and c["qemu_wire_bytes"] == 100
    assert c["qemu_fastest"] == "qemu_multifd_zstd1" and c["qemu_downtime_ms"] == 40
    assert c["cold_bytes_ratio"] == 0.6 and c["time_ratio"] == 0.5
    assert c["return_bytes_ratio"] == 0.05 and c["return_time_ratio"] == 0.25
    assert c["return_bytes_ratio_vs_there"] == round(5 / 60, 4)
    assert "cold_bytes_ratio" not in live.compare(result, "loopback")  # no DWCP run there


def test_a_qemu_contender_is_bounded_by_the_link_and_the_guest_size() -> None:
    # 256 MiB at 100 Mbit/s: 21.5 s a pass, 4 passes under the 120 s floor
    assert live.qemu_limit(256, 100)[0] == live.QEMU_LIMIT_FLOOR_S
    limit, why = live.qemu_limit(1024, 100)  # 4 x 85.9 s
    assert limit == 343.6 and "4 x 1024 MiB / 100 Mbit/s" in why
    assert live.qemu_limit(1024, None)[0] == live.QEMU_LIMIT_FLOOR_S  # unshaped: the floor


def test_compare_leaves_out_a_contender_that_did_not_converge() -> None:
    result = {
        "qemu_precopy_tbf100": {"converged": False, "limit_s": 120.0, "limit_why": "max(...)",
                                "wire_bytes": 50, "total_s": 120.4, "downtime_ms": None},
        "qemu_multifd_zstd1_tbf100": {"converged": True, "wire_bytes": 100, "total_s": 12.0,
                                      "downtime_ms": 90},
        "dwcp_tbf100": {"wire_bytes": 60, "total_s": 6.0, "downtime_ms": 250.0,
                        "zstd_level": 9},
    }
    c = live.compare(result, "tbf100")
    assert c["qemu_fewest_bytes"] == "qemu_multifd_zstd1" and c["qemu_wire_bytes"] == 100
    assert c["qemu_downtime_ms"] == 90 and c["cold_bytes_ratio"] == 0.6
    assert list(c["qemu_left_out"]) == ["qemu_precopy"]
    assert "not converged within its limit of 120 s" in c["qemu_left_out"]["qemu_precopy"]
    result["qemu_multifd_zstd1_tbf100"]["converged"] = False
    result["qemu_multifd_zstd1_tbf100"].update(limit_s=120.0, limit_why="max(...)")
    c = live.compare(result, "tbf100")  # no QEMU converged: no best QEMU, no ratios
    assert "qemu_wire_bytes" not in c and "cold_bytes_ratio" not in c
    assert set(c["qemu_left_out"]) == {"qemu_precopy", "qemu_multifd_zstd1"}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
def test_a_qemu_migration_past_its_limit_is_cancelled_and_the_source_runs_on() -> None:
    """A real QEMU pre-copy that cannot converge (max-bandwidth 1 MiB/s for 128 MiB of
    RAM) is cancelled at its limit: not converged, its time and bytes so far, and the
    source guest still running with its counter and checks intact."""
    assets = load_assets()
    spec = VmSpec(str(assets.kernel), str(assets.initrd), 128, guest_cmdline(0, False))
    setup = live.Setup(spec, "tcg", 1, 0)
    work = Path(tempfile.mkdtemp(prefix="dwcp-bench-limit-", dir="/dev/shm"))
    try:
        run = live._qemu_run(setup, work, False, 0, False, limit_s=3.0,
                             max_bandwidth=1 << 20)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert run["converged"] is False and run["limit_s"] == 3.0
    assert 3.0 <= run["total_s"] < 3.0 + live.CANCEL_WAIT_S
    assert 0 < run["ram_transferred"] < 128 << 20 and run["wire_bytes"] > 0
    assert run["downtime_ms"] is None
    assert run["guest"]["ok"], run["guest"]
    assert run["guest"]["source_status"] == "running"
    assert "auto-converge" in run["settings"]["capabilities"]
    assert run["settings"]["downtime-limit"] == live.DOWNTIME_LIMIT_MS


@pytest.fixture
def lab() -> Iterator[QemuLab]:
    with qemu_lab() as running:
        yield running


def _migrate(lab: QemuLab, src: str, dst: str, mid: str, epoch: int,
             pipe: FramePipe, a_to_b: bool) -> None:
    s, d = lab.backend(src), lab.backend(dst)
    logs = [s.console_path("g"), d.console_path("g")]
    offsets = [p.stat().st_size if p.exists() else 0 for p in logs]
    before = pipe.counted()
    carry = pipe.carry if a_to_b else pipe.reversed()
    report = LiveMigration(s, d, "g", mid, level=1, carry=carry).run(epoch)
    # what the migration sent all crossed the path (plus frame lengths, and on the veth
    # pair IP and TCP headers and acknowledgements)
    assert pipe.counted() - before > report.wire_bytes > 0
    at_fence = lab.read([logs[0]], [offsets[0]]).last_heartbeat
    con = wait_console(logs, lambda c: c.last_heartbeat >= at_fence + 10 and len(c.checks) >= 1,
                       120, "10 heartbeats and a verified round after the migration",
                       offsets=offsets, alive=lambda: d.qemu_pid("g") is not None)
    assert con.boots == 0 and not con.errors and con.counter_gaps() == []


@pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
def test_a_guest_migrates_over_the_relay_and_back_over_the_shaped_veth(lab: QemuLab) -> None:
    lab.boot("a", "g", checks=1)
    pipe = loopback()
    try:
        _migrate(lab, "a", "b", "m1", 2, pipe, True)
    finally:
        pipe.close()
    if _NETNS is not None:
        pytest.skip(f"the 100 Mbit/s leg needs network namespaces: {_NETNS}")
    with TbfLink(100) as link:
        pipe = over_tbf(link, Path(tempfile.mkdtemp(prefix="dwcp-pipe-", dir=lab.dir)))
        try:
            _migrate(lab, "b", "a", "m2", 3, pipe, False)
        finally:
            pipe.close()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~10 boots and migrations under TCG on 2 shared cores
@pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
def test_every_contender_migrates_and_every_guest_keeps_counting() -> None:
    r = live.measure(mib=128, fill=60, at_s=5, tbf=_NETNS is None, return_after_s=5)
    assert r["guests_ok"] is True, r
    assert r["kvm"] in (True, False) and r["qemu_version"].startswith("QEMU emulator")
    for link in ("loopback", "tbf100") if _NETNS is None else ("loopback",):
        for name in ("qemu_precopy", "qemu_multifd_zstd1"):
            run = r[f"{name}_{link}"]
            assert run["guest"]["ok"] and run["wire_bytes"] > 0
            assert "auto-converge" in run["settings"]["capabilities"]
            assert run["settings"]["downtime-limit"] == live.DOWNTIME_LIMIT_MS
            assert not run["converged"] or run["downtime_ms"] >= 0
        dwcp = r[f"dwcp_{link}"]  # the node path: dwcp node processes, dc3 behind the link
        assert dwcp["guest"]["ok"] and dwcp["back"]["guest"]["ok"]
        assert dwcp["guest"]["qemu_copies"] == ["dc3"]
        assert dwcp["back"]["guest"]["qemu_copies"] == ["dc1"]
        # every byte the source node counted crossed the link (plus headers, acks and the
        # mesh's own traffic)
        assert dwcp["wire_bytes"] > dwcp["node_wire_bytes"] > 0
        assert dwcp["downtime_ms"] > 0 and dwcp["rounds"] >= 2
        # back to the copy it left: far less than the first trip
        assert dwcp["back"]["wire_bytes"] < dwcp["wire_bytes"] / 2
        assert r["comparison"][link]["cold_bytes_ratio"] > 0
        assert f"dwcp_inproc_{link}" not in r  # only with inproc=True
    assert r["qemu_multifd_zstd1_loopback"]["wire_bytes"] < r["qemu_precopy_loopback"][
        "wire_bytes"]
    assert r["dirty_tracking"]["zero_page_percent"] < 30
    for key in ("qemu_wire_bytes", "dwcp_wire_bytes", "cold_bytes_ratio", "qemu_total_s",
                "dwcp_total_s", "qemu_downtime_ms", "dwcp_downtime_ms", "return_bytes_ratio",
                "return_time_ratio"):
        assert r[key] is not None, key
