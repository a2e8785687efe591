"""The fence as VmActions carries it out for a backend that stops apart from saving the
device state (the qemu backend's ``stop_for_fence``): the stop first, then the fence's
write and the device state on their own thread while the images are caught up; a save
that fails is the Fence's failure, after the thread ended."""

from __future__ import annotations

import threading
from pathlib import Path

from federation.migration.vocabulary import ActionFailed, Fence, SourceFenced
from federation.vms.actions import VmActions, images_root
from federation.vms.backend import VmError, VmInfo, VmState
from federation.vms.image_backend import ImageBackend
from tests.harness.data import real_pages


class SplitFence(ImageBackend):
    """An image backend whose fence is split as the qemu backend's is."""

    def __init__(self, root: Path, fail_save: bool = False) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, bool, str]] = []
        self.fail_save = fail_save

    def stop_for_fence(self, name: str, migration_id: str, durable: bool = True) -> VmInfo:
        self.calls.append(("stop", durable, threading.current_thread().name))
        return self.fence(name, migration_id) if durable else self.info(name)

    def fence(self, name: str, migration_id: str) -> VmInfo:
        self.calls.append(("fence", True, threading.current_thread().name))
        if self.fail_save:
            raise VmError(f"VM {name!r}: saving the device state: QEMU migration failed")
        return super().fence(name, migration_id)


def _vm(tmp_path: Path, fail_save: bool = False) -> SplitFence:
    b = SplitFence(tmp_path / "vms", fail_save)
    (tmp_path / "mem").write_bytes(real_pages(64))
    b.import_vm("vm1", tmp_path / "mem")
    b.start("vm1", 0)
    return b


def test_the_stop_comes_first_and_the_save_runs_beside_the_root(tmp_path: Path) -> None:
    b = _vm(tmp_path)
    actions = VmActions(b)
    [reply] = actions.carry_out(Fence("vm1", "m1"))
    images = b.open_images("vm1")
    try:
        assert reply == SourceFenced(images_root(images))
    finally:
        for img in images.values():
            img.close()
    me = threading.current_thread().name
    assert b.calls[0] == ("stop", False, me)
    assert [c[:2] for c in b.calls[1:]] == [("fence", True)]
    assert b.calls[1][2].startswith("device-state")  # not the caller's thread
    assert b.info("vm1").state is VmState.FENCED
    assert {"stop_s", "device_s", "root_s", "rehashed_blocks"} <= set(actions.timings)


def test_a_failed_save_fails_the_fence(tmp_path: Path) -> None:
    b = _vm(tmp_path, fail_save=True)
    [reply] = VmActions(b).carry_out(Fence("vm1", "m1"))
    assert isinstance(reply, ActionFailed) and "saving the device state" in reply.reason
