"""The qemu backend on a booted self-checking guest: boot, QMP, fence and unfence, device
state, power-off and cold boot (skips where QEMU or the guest is missing)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from federation.demo.qemu_guest.console import wait_console
from federation.vms.backend import FencedError, StaleEpochError, VmError, VmState
from federation.vms.qemu_backend import QemuBackend
from federation.vms.qemu_machine import QemuProcess, socket_path
from federation.vms.vm_dir import read_meta, write_meta
from tests.harness.qemu import QemuLab, qemu_lab, qemu_missing

pytestmark = pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))


@pytest.fixture(scope="module")
def lab() -> Iterator[QemuLab]:
    with qemu_lab() as running:
        yield running


def test_boot_fence_unfence_and_power_cycle(lab: QemuLab) -> None:
    booted = lab.boot("a", "g1")
    a = lab.backend("a")
    assert booted.boots == 1 and not booted.errors
    assert a.info("g1").state is VmState.RUNNING and a.info("g1").epoch == 1
    assert a.guest_running("g1") and a.accel_of("g1") == "tcg"
    layout = dict(a.info("g1").layout)
    # the device image: what the fence saves the device state into (4 MiB)
    assert layout == {"memory": 128 * 256, "disk-0": 16 * 256, "device": 1024}
    # The node reads guest RAM while the guest runs: the heartbeat line is in it.
    images = a.open_images("g1")
    try:
        assert images["memory"].page_count == 128 * 256
    finally:
        for img in images.values():
            img.close()

    # the stop alone (the fence's write comes beside the scan): an abort before the write
    # resumes the guest as it was
    a.stop_for_fence("g1", "m0", durable=False)
    assert not a.guest_running("g1") and a.info("g1").state is VmState.RUNNING
    assert a.release_fence("g1", "m0").state is VmState.RUNNING and a.guest_running("g1")

    a.fence("g1", "m1")
    assert not a.guest_running("g1")  # QMP says paused
    assert a.fence("g1", "m1").state is VmState.FENCED  # idempotent
    with pytest.raises(FencedError):
        a.fence("g1", "m2")
    with pytest.raises(FencedError):
        a.start("g1", 2)
    state = a.device_state("g1", "m1")
    assert len(state) > 0 and a.device_state("g1", "m1") == state  # saved once
    hb = lab.read([lab.console("a", "g1")]).last_heartbeat

    a.release_fence("g1", "m1")  # cont from postmigrate: as it was
    con = wait_console([lab.console("a", "g1")],
                       lambda c: c.last_heartbeat >= hb + 10 and len(c.checks) >= 3, 120,
                       "10 more heartbeats after the fence was lifted")
    assert con.boots == 1 and con.counter_gaps() == [] and not con.errors
    assert a.release_fence("g1", "m1").state is VmState.RUNNING  # idempotent

    with pytest.raises(StaleEpochError):
        a.start("g1", 0)
    a.stop("g1")
    assert a.info("g1").state is VmState.STOPPED and a.qemu_pid("g1") is None
    offset = lab.console("a", "g1").stat().st_size
    a.start("g1", 3)  # a cold boot: the counter starts again at 1
    con = wait_console([lab.console("a", "g1")], lambda c: len(c.checks) >= 1, 180,
                       "a verified round after the second boot", offsets=[offset])
    assert con.boots == 1 and con.heartbeats[0] == 1 and not con.errors
    a.stop("g1")


def test_a_new_backend_attaches_to_running_guests(lab: QemuLab) -> None:
    lab.boot("c", "g2", checks=1)
    c = lab.backend("c")
    pid = c.qemu_pid("g2")
    c.close()  # the node goes away; the guest keeps running
    again = QemuBackend(c.root, accel="tcg")
    lab.backends["c"] = again
    assert again.qemu_pid("g2") == pid and again.guest_running("g2")

    # a crash between a RUNNING meta.json and `cont` leaves a paused QEMU: resumed
    again.qmp("g2").execute("stop")
    assert not again.guest_running("g2")
    again.close()
    again = QemuBackend(c.root, accel="tcg")
    lab.backends["c"] = again
    assert again.qemu_pid("g2") == pid and again.guest_running("g2")

    # a node killed while it throttled the guest (SIGSTOP/SIGCONT duty cycle) may leave
    # the whole QEMU process stopped, deaf to QMP: attached and running again
    os.kill(pid, signal.SIGSTOP)
    again.close()
    again = QemuBackend(c.root, accel="tcg")
    lab.backends["c"] = again
    assert again.qemu_pid("g2") == pid and again.guest_running("g2")

    # a crash between a RETIRED meta.json and `quit` leaves a fenced QEMU: powered off
    again.fence("g2", "m1")
    meta = read_meta(c.root / "g2", "g2")
    write_meta(c.root / "g2", {**meta, "state": VmState.RETIRED.value})
    again.close()
    again = QemuBackend(c.root, accel="tcg")
    lab.backends["c"] = again
    assert again.qemu_pid("g2") is None
    assert QemuProcess.attach(c.root / "g2" / "qemu.pid", again.ram_path("g2"),
                              socket_path(c.root / "g2", "qmp")) is None


def test_bad_requests_name_the_vm_and_change_nothing(lab: QemuLab) -> None:
    a = lab.backend("a")
    with pytest.raises(VmError, match="no VM 'ghost'"):
        a.info("ghost")
    with pytest.raises(VmError, match="created from a spec"):
        a.import_vm("x", lab.dir / "nothing")
    with pytest.raises(VmError, match="machine spec"):
        lab.backend("d").prepare_incoming("y", [("memory", 256)], "m9")
    assert lab.backend("d").list_vms() == []
    with pytest.raises(VmError, match="is not the layout"):
        lab.backend("d").prepare_incoming("y", [("memory", 256)], "m9", lab.spec().to_json())
    assert lab.backend("d").list_vms() == []
    writers = lab.backend("d").prepare_incoming("y", [("memory", 128 * 256)], "m9",
                                                lab.spec().to_json())
    for w in writers.values():
        w.close()
    assert lab.backend("d").info("y").state is VmState.INCOMING
    lab.backend("d").discard_incoming("y", "m9")
    assert lab.backend("d").info("y").state is VmState.RETIRED


def _copy_fenced(src: QemuBackend, dst: QemuBackend, vm: str, mid: str) -> None:
    """What a migration's rounds leave at ``dst``: every image of the fenced ``vm`` (its
    device image with the saved device state included) in ``dst``'s incoming copy, whose
    QEMU waits with ``-incoming defer``."""
    writers = dst.prepare_incoming(vm, src.info(vm).layout, mid, src.machine_spec(vm))
    images = src.open_images(vm)
    try:
        for name, img in images.items():
            for first in range(0, img.page_count, 256):
                n = min(256, img.page_count - first)
                writers[name].write(first, img.view(first, n))
    finally:
        for w in [*writers.values(), *images.values()]:
            w.close()
    dst.prepare_machine(vm)


def test_the_device_state_loads_before_the_start_and_the_guest_runs_only_at_cont(
        lab: QemuLab) -> None:
    lab.boot("a", "g3", checks=1)
    a, b, c = lab.backend("a"), lab.backend("b"), lab.backend("c")
    a.fence("g3", "m3")
    hb = lab.read([lab.console("a", "g3")]).last_heartbeat
    _copy_fenced(a, c, "g3", "m3")
    _copy_fenced(a, b, "g3", "m3")

    # an abort after the load: the loaded copy is powered off, never run
    c.load_device("g3", "m3")
    assert not c.guest_running("g3") and c.qmp("g3").execute("query-status")["status"] \
        == "paused"
    c.discard_incoming("g3", "m3")
    assert c.qemu_pid("g3") is None and c.info("g3").state is VmState.RETIRED

    with pytest.raises(VmError, match="not incoming for migration 'other'"):
        b.load_device("g3", "other")
    # a node killed mid-load: its migrate-incoming began and the state never came. QEMU
    # takes no second migrate-incoming, so the restarted node's load starts a fresh
    # -incoming QEMU on the same RAM file (the acceptance run's StartAtTarget failed with
    # "The incoming migration has already been started" before this)
    half = b.qemu_pid("g3")
    b.qmp("g3").execute("migrate-incoming", uri=f"unix:{socket_path(b.root / 'g3', 'incoming')}")
    b.close()
    b = QemuBackend(b.root, accel="tcg")
    lab.backends["b"] = b
    b.load_device("g3", "m3")
    assert b.qemu_pid("g3") not in (None, half)
    pid = b.qemu_pid("g3")
    b.load_device("g3", "m3")  # idempotent: QEMU says it holds the state
    assert not b.guest_running("g3") and b.qemu_pid("g3") == pid
    # a node restarted between the load and the commit: the start loads nothing again
    b.close()
    again = QemuBackend(b.root, accel="tcg")
    lab.backends["b"] = again
    assert again.qemu_pid("g3") == pid and not again.guest_running("g3")
    a.retire("g3", "m3")
    offset = lab.console("b", "g3").stat().st_size
    again.start("g3", 2)
    assert again.qemu_pid("g3") == pid and again.info("g3").state is VmState.RUNNING
    con = wait_console([lab.console("a", "g3"), lab.console("b", "g3")],
                       lambda c: c.last_heartbeat >= hb + 10 and len(c.checks) >= 2, 120,
                       "10 heartbeats at the target", offsets=[0, offset])
    assert con.boots == 1 and con.counter_gaps() == [] and not con.errors
    arrival = again.arrival("g3")
    assert arrival is not None and arrival["migration_id"] == "m3"
    # the start's split: its durable write, then QMP status and cont (in the downtime)
    assert arrival["start_meta_ms"] >= 0 and arrival["start_cont_ms"] >= 0
    again.stop("g3")
