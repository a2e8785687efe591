"""A node's restart resumes the VMs it owns (federation.node.assembly.Node._resume_vms):
a start that fails with an OSError (a full disk) is tried again until it goes through,
instead of ending the node (make netns-chaos seed 32)."""

from __future__ import annotations

import errno
import io
from types import SimpleNamespace
from typing import Any

import trio

from federation.node import assembly
from federation.node.assembly import Node
from federation.vms.backend import VmError, VmInfo, VmState
from mesh.runtime.log import JsonLog


class _Backend:
    def __init__(self, full_for: int) -> None:
        self.full_for = full_for  # starts refused with ENOSPC before one goes through
        self.started: list[str] = []

    def list_vms(self) -> list[VmInfo]:
        return [VmInfo(n, 3, VmState.RUNNING, (("memory", 1),))
                for n in ("mine", "theirs", "broken") if n not in self.started]

    def start(self, name: str, epoch: int) -> None:
        if name == "broken":
            raise VmError("VM 'broken': its meta.json is unreadable")
        if self.full_for:
            self.full_for -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        self.started.append(name)


class _Node:
    _resume_vms = Node._resume_vms
    _resume_later = Node._resume_later

    def __init__(self, backend: _Backend) -> None:
        self.name = "dc1"
        self.backend = backend
        owners = {"mine": "dc1", "broken": "dc1", "theirs": "dc2"}
        self.core = SimpleNamespace(ledger=SimpleNamespace(owner=owners.get))
        self.out = io.StringIO()
        self.log = JsonLog("dc1", self.out)


def test_a_resume_refused_by_a_full_disk_is_tried_again_until_it_goes_through(
        monkeypatch: Any) -> None:
    monkeypatch.setattr(assembly, "RESUME_RETRY_S", (0.01, 0.02))
    node = _Node(_Backend(full_for=3))
    again = node._resume_vms()
    assert again == ["mine"] and node.backend.started == []
    trio.run(node._resume_later, again)
    assert node.backend.started == ["mine"]  # not theirs (dc2 owns it), not broken
    log = node.out.getvalue()
    assert log.count('"vm_resume_failed","vm":"mine"') == 3 and '"retry":true' in log
    assert '"vm_not_resumed","vm":"theirs"' in log
    assert log.count('"vm_resume_failed","vm":"broken"') == 1  # a VmError: not retried
