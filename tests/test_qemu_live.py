"""Live migration of a booted self-checking guest between two qemu backends in one process:
the counter continues where the source stopped and the checks keep passing, there and
back; an abort at the fence resumes the source as it was (skips where QEMU or the guest
is missing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from federation.demo.qemu_guest.console import wait_console
from federation.vms.backend import VmError, VmState
from federation.vms.live_migration import LiveMigration
from tests.harness.qemu import QemuLab, qemu_lab, qemu_missing

pytestmark = pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))


@pytest.fixture
def lab() -> Iterator[QemuLab]:
    with qemu_lab() as running:
        yield running


def _migrate_and_check(lab: QemuLab, src: str, dst: str, mid: str, epoch: int) -> None:
    s, d = lab.backend(src), lab.backend(dst)
    offsets = [s.console_path("g").stat().st_size,
               d.console_path("g").stat().st_size if d.console_path("g").exists() else 0]
    report = LiveMigration(s, d, "g", mid).run(epoch)
    before = lab.read([s.console_path("g")], [offsets[0]]).last_heartbeat  # at the fence
    assert s.info("g").state is VmState.RETIRED and s.qemu_pid("g") is None
    assert d.info("g").state is VmState.RUNNING and d.info("g").epoch == epoch
    # stop -> cont covers the device state and a final round of only what changed
    assert report.downtime_s == pytest.approx(sum(report.stop_window.values()), abs=0.01)
    assert report.final_pages < 128 * 256 // 4
    logs = [s.console_path("g"), d.console_path("g")]
    con = wait_console(logs, lambda c: c.last_heartbeat >= before + 20 and len(c.checks) >= 2,
                       120, "20 heartbeats and 2 verified rounds after the migration",
                       offsets=offsets, alive=lambda: d.qemu_pid("g") is not None)
    assert con.boots == 0, "the target booted instead of resuming"
    assert con.counter_gaps() == [], f"the counter jumped: {con.counter_gaps()}"
    assert not con.errors
    target_only = lab.read([d.console_path("g")], [offsets[1]])
    # the first whole line the target printed follows the source's last whole line (or
    # the line the fence cut in two, which the joined console above shows whole)
    assert target_only.heartbeats[0] in (before + 1, before + 2)


def test_a_booted_guest_migrates_there_and_back_and_keeps_counting(lab: QemuLab) -> None:
    lab.boot("a", "g")
    _migrate_and_check(lab, "a", "b", "m1", 2)
    # back to a, which still holds its earlier copy as the diff's base
    _migrate_and_check(lab, "b", "a", "m2", 3)


def test_an_abort_at_any_stage_resumes_the_source_as_it_was(lab: QemuLab) -> None:
    lab.boot("a", "g")
    a, b = lab.backend("a"), lab.backend("b")
    for stage in ("precopy", "final_round", "target_load"):
        m = LiveMigration(a, b, "g", f"m-{stage}")
        m.precopy()
        if stage != "precopy":
            # the switch-over up to the target's start: fenced, device state saved
            state = m.fence()
            m.final_round()
            assert a.info("g").state is VmState.FENCED and not a.guest_running("g")
            if stage == "target_load":
                # the target's QEMU refuses a truncated device state: nothing runs there
                with pytest.raises(VmError, match="device state"):
                    b.start("g", 2, state[: len(state) // 2])
                assert not b.guest_running("g")
        hb = lab.read([a.console_path("g")]).last_heartbeat
        checks = len(lab.read([a.console_path("g")]).checks)
        m.abort()
        assert a.info("g").state is VmState.RUNNING and a.guest_running("g"), stage
        assert b.info("g").state is VmState.RETIRED and b.qemu_pid("g") is None, stage
        con = wait_console([a.console_path("g")],
                           lambda c, hb=hb, n=checks: c.last_heartbeat >= hb + 10
                           and len(c.checks) >= n + 1, 120,
                           f"10 heartbeats and a verified round after the abort at {stage}")
        assert con.boots == 1 and con.counter_gaps() == [] and not con.errors, stage
