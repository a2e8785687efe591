"""Both sessions, the real ledger state machine, the real rounds core of each DC and two
image backends on disk, with the page writer running during pre-copy. Rounds are the v1
window/ack protocol (every page in round 1, the dirty set after), its messages passed in
process and its page actions carried out by VmActions on the backends; the network, HDE
and AMST are not here.

It checks what a user relies on: after the commit the target's images are the
source's images at the fence, they equal what the writer last wrote, the target runs
at epoch 1 and the source copy is retired; after a failed verification the VM runs
at its source again, with its writer, and the target's copy is discarded.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from consensus.ledger import (
    AbortMigration,
    AnnounceRoot,
    BeginMigration,
    CommitMigration,
    ImportVm,
    Ledger,
    LedgerResult,
    MigrateVm,
    RegisterVm,
)
from federation.demo.guest_backend import WritingBackend
from federation.demo.guest_writer import expected_pages, mismatches
from federation.migration.round_events import PAGE_ACTIONS, SessionView, ToSession
from federation.migration.rounds import RoundsCore, after_vm_action
from federation.migration.session import SessionBase
from federation.migration.source import SourceSession
from federation.migration.target import TargetSession
from federation.migration.vocabulary import (
    CancelRound,
    Fence,
    LedgerAborted,
    LedgerBegun,
    LedgerCommitted,
    LedgerRefused,
    LedgerRootAnnounced,
    Phase,
    PrecopyLimits,
    SendRound,
    SubmitLedger,
    Verify,
)
from federation.vms.actions import VM_ACTIONS, VmActions, images_root
from federation.vms.backend import VmState
from mesh import wire
from mesh.core import Notify, Received, Send
from mesh.hde.image import PAGE_SIZE
from sim.hosts.operators import SIM_OPERATORS, OperatorSigner
from tests.harness.data import real_pages
from tests.harness.waiting import poll_until

MID = "m-e2e"


class TwoDCs:
    def __init__(self, tmp: Path, limits: PrecopyLimits, corrupt_target: bool = False) -> None:
        self.src = WritingBackend(tmp / "dc1")
        self.tgt = WritingBackend(tmp / "dc2")
        (tmp / "mem").write_bytes(real_pages(512))
        (tmp / "disk").write_bytes(real_pages(64, b"disk"))
        self.src.import_vm("vm1", tmp / "mem", [tmp / "disk"])
        self.src.start("vm1", 0)
        self.src.attach_writer("vm1", seed=42, rate=4000)
        self.src_vm = VmActions(self.src)
        self.tgt_vm = VmActions(self.tgt)
        self.rounds = {n: RoundsCore(n, lambda mid, n=n: self.view(n, mid)) for n in ("dc1", "dc2")}
        self.ledger = Ledger(("dc1", "dc2", "dc3"), SIM_OPERATORS)
        self.rids = {"dc1": 0, "dc2": 0}
        ops = OperatorSigner("ops", prefix="e2e")
        self.execute("dc1", RegisterVm("vm1", "dc1", ops.authorize(
            ImportVm("vm1", "dc1", str(tmp / "mem"), (str(tmp / "disk"),)), 1.0)))
        self.corrupt_target = corrupt_target
        self.fenced_digest: str | None = None
        self.notes: list[Notify] = []
        info = self.src.info("vm1")
        self.source = SourceSession.plan("dc1", MID, "vm1", "dc2", 0, info.layout, limits,
                                         self.ledger.policy, (1,), (1, 3),
                                         ops.authorize(MigrateVm("vm1", "dc2"), 2.0))
        self.target: TargetSession | None = None
        self.queue: deque[tuple[str, Any]] = deque()

    def execute(self, client: str, command: Any) -> LedgerResult:
        self.rids[client] += 1
        raw = self.ledger.execute(client, self.rids[client], wire.encode(command))
        return wire.decode(raw, expect=(LedgerResult,))

    def session(self, node: str) -> SessionBase:
        s = self.source if node == "dc1" else self.target
        assert s is not None
        return s

    def view(self, node: str, mid: str) -> SessionView | None:
        """What each DC's rounds core knows of its own session."""
        s = self.source if node == "dc1" else self.target
        if s is None or mid != MID:
            return None
        return SessionView(s.vm, s.source, s.target, s.done)

    def run(self) -> None:
        self.dispatch("dc1", self.source.start(0.0))
        while self.queue:
            node, event = self.queue.popleft()
            self.dispatch(node, self.session(node).handle(time.monotonic(), event))

    def dispatch(self, node: str, actions: list[Any]) -> None:
        vm = self.src_vm if node == "dc1" else self.tgt_vm
        rounds = self.rounds[node]
        for a in actions:
            if isinstance(a, SubmitLedger):
                self.submit(node, a.command)
            elif isinstance(a, Send):
                frame = wire.encode(a.message)
                received = Received(node, wire.decode(frame), frame)
                if a.message.wire_tag.startswith("data."):  # a round's chunk or ack
                    self.dispatch(a.peer, self.rounds[a.peer].handle(time.monotonic(),
                                                                     received))
                else:
                    self.queue.append((a.peer, received))
            elif isinstance(a, (SendRound, CancelRound)):
                self.dispatch(node, rounds.handle(time.monotonic(), a))
            elif isinstance(a, ToSession):
                self.queue.append((node, a.event))
            elif isinstance(a, PAGE_ACTIONS):
                for reply in vm.carry_out_pages(a):
                    self.dispatch(node, rounds.handle(time.monotonic(), reply))
            elif isinstance(a, VM_ACTIONS):
                if isinstance(a, Verify) and self.corrupt_target:
                    self.tgt_vm.incoming[MID]["memory"].write(3, b"\xee" * PAGE_SIZE)
                replies = vm.carry_out(a)
                if isinstance(a, Fence):
                    self.fenced_digest = self.digest(self.src)
                for news in after_vm_action(a, replies):
                    self.dispatch(node, rounds.handle(time.monotonic(), news))
                self.queue.extend((node, r) for r in replies)
            elif isinstance(a, Notify):
                self.notes.append(a)
            # SetTimer/CancelTimer: nothing is lost in process, so no timer ever fires;
            # RoundReport: a node's log line

    def submit(self, node: str, command: Any) -> None:
        result = self.execute(node, command)
        if not result.ok:
            self.queue.append((node, LedgerRefused(command, result.error)))
            return
        if isinstance(command, BeginMigration):
            self.queue.append(("dc1", LedgerBegun(MID, command.epoch)))
            self.target, actions = TargetSession.from_ledger(
                "dc2", MID, "vm1", "dc1", command.epoch, self.source.limits, time.monotonic())
            self.dispatch("dc2", actions)
        elif isinstance(command, AnnounceRoot):
            self.queue.append(("dc1", LedgerRootAnnounced(MID, command.root)))
            self.queue.append(("dc2", LedgerRootAnnounced(MID, command.root)))
        else:
            fact: Any = (LedgerCommitted(MID, result.epoch, command.root)
                         if isinstance(command, CommitMigration) else LedgerAborted(MID))
            assert isinstance(command, (CommitMigration, AbortMigration))
            self.queue.append(("dc1", fact))
            self.queue.append(("dc2", fact))

    @staticmethod
    def digest(backend: WritingBackend) -> str:
        images = backend.open_images("vm1")
        h = hashlib.sha256()
        for name in sorted(images):
            h.update(images[name].view(0, images[name].page_count))
            images[name].close()
        return h.hexdigest()


@pytest.mark.parametrize("limits", [PrecopyLimits(5, 0.5), PrecopyLimits(4, 0.0)])
def test_migration_moves_the_vm_with_its_writer_running(tmp_path: Path,
                                                        limits: PrecopyLimits) -> None:
    w = TwoDCs(tmp_path, limits)
    writer = w.src.writer("vm1")
    assert writer is not None
    # the workload has dirtied pages before the migration starts
    poll_until(lambda: writer.writer.seq >= 100, "100 writes by the page writer")
    w.run()
    assert w.ledger.owner("vm1") == "dc2" and w.ledger.epoch("vm1") == 1
    assert w.source.phase is Phase.COMMITTED and w.target is not None
    assert w.target.phase is Phase.COMMITTED
    assert 2 <= w.source.round <= limits.max_rounds  # pre-copy, then the final round
    assert w.src.info("vm1").state is VmState.RETIRED
    info = w.tgt.info("vm1")
    assert info.state is VmState.RUNNING and info.epoch == 1
    assert TwoDCs.digest(w.tgt) == w.fenced_digest == TwoDCs.digest(w.src)
    expected = expected_pages(w.src.path("vm1") / "writer.log")
    assert len(expected) > 50
    images = w.tgt.open_images("vm1")
    assert mismatches(images, expected) == []
    assert images_root(images) == w.ledger.migrations[MID].root
    for img in images.values():
        img.close()
    done = [n.detail for n in w.notes if n.kind == "migration.done"]
    assert sorted(d.role for d in done) == ["source", "target"]
    w.src.close()


def test_failed_verification_returns_the_vm_to_its_source(tmp_path: Path) -> None:
    w = TwoDCs(tmp_path, PrecopyLimits(5, 0.5), corrupt_target=True)
    w.run()
    assert w.ledger.owner("vm1") == "dc1" and w.ledger.epoch("vm1") == 0
    assert w.ledger.migrations[MID].state == "aborted"
    assert w.source.phase is Phase.ABORTED and "does not match" in w.target.reason  # type: ignore[union-attr]
    assert w.src.info("vm1").state is VmState.RUNNING
    assert w.src.writer("vm1") is not None  # the workload runs again
    assert w.tgt.info("vm1").state is VmState.RETIRED
    w.src.close()
    images = w.src.open_images("vm1")
    assert mismatches(images, expected_pages(w.src.path("vm1") / "writer.log")) == []
    for img in images.values():
        img.close()
