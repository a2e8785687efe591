"""Operator requests are idempotent and their outcome knowable (issue 16 item 3): a request
carries its id; when the ledger cannot answer in time the API says "pending, id X" and
``dwcp status --request X`` later tells committed or refused; sending it again under its
id never applies it twice; ``dwcp vm delete`` goes through the ledger and every DC
removes the VM's copy; a stuck import is finished or cleaned up."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from consensus.ledger import ImportVm, Ledger
from consensus.ledger_commands import MigrationRecord, VmRecord
from federation.migration.vocabulary import DiscardIncoming, Retire, StartAtTarget, Unfence
from federation.node import reconcile
from federation.node.requests import OperatorRequests
from federation.vms.backend import VmInfo, VmState
from tests.harness.node import ext4_image, memory_image
from tests.harness.processes import NAMES, NodeProcesses, node_processes, run_dwcp, vm_dir

LAYOUT = (("memory", 1),)


def _vm(name: str, state: VmState, epoch: int = 0) -> VmInfo:
    return VmInfo(name, epoch, state, LAYOUT, "")


def test_reconcile_starts_late_registers_and_removes_deleted_copies() -> None:
    ledger = Ledger(["dc1", "dc2", "dc3", "dc4"])
    ledger.vms["late"] = VmRecord("late", "dc1", 2, None)  # registered after the API gave up
    ledger.vms["moving"] = VmRecord("moving", "dc1", 0, "m-1")
    ledger.vms["theirs"] = VmRecord("theirs", "dc2", 0, None)
    ledger.deleted.update({"gone": 3, "again": 1, "old": 0})
    local = [_vm("late", VmState.STOPPED), _vm("moving", VmState.STOPPED),
             _vm("theirs", VmState.STOPPED), _vm("gone", VmState.RUNNING, 3),
             _vm("again", VmState.STOPPED), _vm("old", VmState.RETIRED),
             _vm("newer", VmState.RUNNING, 4), _vm("copying", VmState.RUNNING)]
    ledger.deleted["newer"] = 2  # a copy above the deleted epoch is another life of it
    ledger.deleted["copying"] = 0
    steps = reconcile.plan("dc1", ledger, local, busy={"copying"})
    assert steps == [reconcile.StartStaged("late", 2), reconcile.RemoveDeleted("gone", 3),
                     reconcile.RemoveDeleted("old", 0)]


def _mig(mid: str, vm: str, source: str, target: str, state: str,
         epoch: int = 4) -> MigrationRecord:
    return MigrationRecord(mid, vm, source, target, epoch, state, b"")


def test_reconcile_finishes_a_decided_migration_a_killed_node_did_not_act_on() -> None:
    ledger = Ledger(["dc1", "dc2", "dc3", "dc4"])
    for mid, vm, src, dst, state in (("m-ret", "ret", "dc1", "dc2", "committed"),
                                     ("m-unf", "unf", "dc1", "dc2", "aborted"),
                                     ("m-go", "go", "dc2", "dc1", "committed"),
                                     ("m-drop", "drop", "dc2", "dc1", "aborted"),
                                     ("m-live", "live", "dc1", "dc2", "begun"),
                                     ("m-old", "moved", "dc2", "dc1", "committed"),
                                     ("m-busy", "busy", "dc1", "dc2", "committed")):
        ledger.migrations[mid] = _mig(mid, vm, src, dst, state)
    ledger.vms["ret"] = VmRecord("ret", "dc2", 5, None)
    ledger.vms["unf"] = VmRecord("unf", "dc1", 4, None)
    ledger.vms["go"] = VmRecord("go", "dc1", 5, None)
    ledger.vms["drop"] = VmRecord("drop", "dc2", 4, None)
    ledger.vms["live"] = VmRecord("live", "dc1", 4, "m-live")
    # committed to dc1, then already on its way elsewhere: dc1 must not start it again
    ledger.vms["moved"] = VmRecord("moved", "dc1", 5, "m-next")

    def held(name: str, state: VmState, mid: str) -> VmInfo:
        return VmInfo(name, 4, state, LAYOUT, mid)

    local = [held("ret", VmState.FENCED, "m-ret"), held("unf", VmState.FENCED, "m-unf"),
             held("go", VmState.INCOMING, "m-go"), held("drop", VmState.INCOMING, "m-drop"),
             held("live", VmState.FENCED, "m-live"), held("moved", VmState.INCOMING, "m-old"),
             held("busy", VmState.FENCED, "m-busy")]
    steps = reconcile.plan("dc1", ledger, local, busy={"busy"})
    assert steps == [Retire("ret", "m-ret"), Unfence("unf", "m-unf"),
                     StartAtTarget("go", "m-go", 5), DiscardIncoming("drop", "m-drop")]
    # another DC's view of the same VMs: none of them is its step to take
    assert reconcile.plan("dc3", ledger, local) == []


def test_a_request_is_pending_until_the_ledger_knows_it_then_unknown_after_the_window(
) -> None:
    ledger = Ledger(["dc1", "dc2", "dc3", "dc4"])
    book = OperatorRequests()
    assert book.outcome(ledger, "admin", "id-00000001", 100.0)["outcome"] == "unknown"
    book.begin("admin", "id-00000001", "delete", "vm1", 100.0)
    doc = book.outcome(ledger, "admin", "id-00000001", 130.0)
    assert (doc["outcome"], doc["command"], doc["subject"]) == ("pending", "delete", "vm1")
    assert book.outcome(ledger, "admin", "id-00000001", 401.0)["outcome"] == "unknown"


def _outcome(nodes: NodeProcesses, dc: str, rid: str) -> str:
    return str(nodes.api(dc).ok("GET", f"/api/requests/{rid}")["outcome"])


def _send_until_committed(nodes: NodeProcesses, rid: str, argv: list[str]) -> None:
    """Send the request again under its id until the ledger has it committed (the first
    copy may have made it already; a copy sent while the restarted DCs settle may be
    answered "pending" again): however many copies, it applies once."""
    deadline = time.monotonic() + 60
    while _outcome(nodes, "dc1", rid) != "committed":
        assert time.monotonic() < deadline, f"{rid} not committed within 60 s"
        r = run_dwcp(*argv)
        assert r.returncode in (0, 3), (r.stdout, r.stderr)


@pytest.mark.processes
def test_pending_then_committed_once_delete_and_a_stuck_import(tmp_path: Path) -> None:
    memory = memory_image(tmp_path / "memory.img", 1 << 20)
    disk = ext4_image(tmp_path / "disk.img")
    # dc1 waits 2 s for the ledger before it answers "pending" (default 30 s)
    with node_processes(tmp_path, node_settings="[ledger]\nrequest_timeout = 2\n") as nodes:
        at = ("--config", str(nodes.cfg), "--name", "dc1")
        imp = ("vm", "import", "vm1", "--memory", str(memory), "--disk", str(disk), *at)
        r = run_dwcp(*imp, "--request-id", "import-vm1-01")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("imported vm1: ") and "(request import-vm1-01)" in r.stdout
        r = run_dwcp(*imp, "--request-id", "import-vm1-01")  # again: nothing applies twice
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == ("request import-vm1-01 (import-vm vm1) was "
                                    "committed before (epoch 0); nothing applied again")
        r = run_dwcp("status", "--request", "import-vm1-01", *at)
        assert r.returncode == 0 and r.stdout.strip() == (
            "request import-vm1-01 of admin: committed (import-vm vm1), epoch 0")

        # no quorum: dc3 and dc4 stopped. A delete and an import cannot be decided
        assert nodes.stop("dc3") == 0 and nodes.stop("dc4") == 0
        nodes.wait("dc1 sees dc3 and dc4 gone", lambda: len(
            [p for p, link in nodes.status("dc1")["links"].items() if link["connected"]]) == 1)
        r = run_dwcp("vm", "delete", "vm1", "--request-id", "delete-vm1-01", *at)
        assert r.returncode == 3, (r.stdout, r.stderr)
        assert r.stdout.startswith("pending, id delete-vm1-01: ")
        assert "dwcp status --request delete-vm1-01" in r.stdout
        r = run_dwcp("status", "--request", "delete-vm1-01", *at)
        assert r.returncode == 3 and "delete-vm1-01 of admin: pending (delete-vm vm1)" in r.stdout
        imp2 = ("vm", "import", "vm2", "--memory", str(memory), *at)
        r = run_dwcp(*imp2, "--request-id", "import-vm2-01")
        assert r.returncode == 3 and r.stdout.startswith("pending, id import-vm2-01: ")
        assert (vm_dir(nodes, "dc1", "vm1") / "meta.json").exists()  # nothing deleted yet

        # the quorum is back: sent again under their ids, each applies exactly once
        nodes.start("dc3")
        nodes.start("dc4")
        nodes.wait("every DC ready", lambda: all(nodes.ready(n) for n in NAMES))
        for rid, argv in (("delete-vm1-01", ("vm", "delete", "vm1", *at)),
                          ("import-vm2-01", imp2)):
            _send_until_committed(nodes, rid, [*argv, "--request-id", rid])
        r = run_dwcp("vm", "delete", "vm1", "--request-id", "delete-vm1-01", *at)
        assert r.returncode == 0 and "committed before (epoch 0); nothing applied" in r.stdout
        # the same request id at another node: the ledger's record, the same everywhere
        r = run_dwcp("status", "--request", "delete-vm1-01", "--json", "--config",
                     str(nodes.cfg), "--name", "dc4")
        doc = json.loads(r.stdout)
        assert (doc["outcome"], doc["command"], doc["subject"]) == (
            "committed", "operator.delete-vm", "vm1")

        # the deleted VM's copy is gone; the import that committed late runs at dc1
        nodes.wait("vm1's files removed at dc1", lambda: not vm_dir(nodes, "dc1", "vm1")
                   .exists())
        nodes.wait("vm2 running at dc1", lambda: nodes.vm_here("dc1", "vm2") == "running")
        assert all(v["name"] != "vm1" for v in nodes.api("dc2").ok("GET", "/api/vms"))

        # a registered VM whose files are gone (a broken import) is deleted all the same
        shutil.rmtree(vm_dir(nodes, "dc1", "vm2"))
        r = run_dwcp("vm", "delete", "vm2", *at)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("deleted vm2 at epoch 0 (request ")
        # a staged import never registered is removed at its node, without the ledger
        staged = nodes.api("dc1").ok("POST", "/api/imports",
                                     ImportVm("vm3", "dc1", str(memory), ()))
        nodes.wait("vm3 staged", lambda: nodes.api("dc1").ok(
            "GET", "/api/imports/vm3")["state"] == "staged")
        assert staged["vm"] == "vm3"
        r = run_dwcp("vm", "delete", "vm3", *at)
        assert r.returncode == 0 and "a staged import, never registered" in r.stdout
        assert not vm_dir(nodes, "dc1", "vm3").exists()
        assert nodes.stop_all() == {n: 0 for n in NAMES}

