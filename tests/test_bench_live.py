"""``dwcp bench live``: says what it could not run; runs QEMU's contenders and the
in-process DWCP migration on the self-checking guest (slow: several boots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import live
from tests.harness.qemu import qemu_missing


def test_without_the_guest_it_names_what_is_missing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DWCP_GUEST", str(tmp_path / "nothing"))
    r = live.measure(tbf=False)
    assert r["missing"] and ("make qemu-guest" in r["missing"][0])
    assert "guests_ok" not in r


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five boots and migrations under TCG on 2 shared cores
@pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
def test_loopback_contenders_migrate_and_every_guest_keeps_counting() -> None:
    r = live.measure(mib=128, fill=60, at_s=5, tbf=False, return_after_s=5)
    assert r["guests_ok"] is True, r
    assert r["kvm"] in (True, False) and r["qemu_version"].startswith("QEMU emulator")
    for name in ("qemu_precopy", "qemu_multifd_zstd1", "qemu_multifd_zstd3"):
        run = r[f"{name}_loopback"]
        assert run["guest"]["ok"] and run["wire_bytes"] > 0 and run["downtime_ms"] >= 0
    # compression shrinks what precopy sends raw
    assert r["qemu_multifd_zstd1_loopback"]["wire_bytes"] < r["qemu_precopy_loopback"][
        "wire_bytes"]
    assert r["dirty_tracking"]["zero_page_percent"] < 30
    dwcp = r["dwcp_inprocess_loopback"]
    assert dwcp["there"]["guest"]["ok"] and dwcp["back"]["guest"]["ok"]
    # back to the copy it left: far less than the first trip
    assert dwcp["back"]["wire_bytes"] < dwcp["there"]["wire_bytes"] / 2
