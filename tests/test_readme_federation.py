"""The README's "Running a federation" section, walked end to end with four real nodes
(issue 16, acceptance): federation init, four nodes, import, migrate, status, cancel,
policy, delete, the outcome of a request, every node restarted, status again. Each
command line is taken from README.md and run as written, with its placeholders filled
in: ``D``, ``/etc/dwcp``, ``~`` and ``/var/lib/dwcp`` under the test's directory, a free
base port (the machine is shared), ``MIGRATION-ID`` and ``REQUEST-ID`` from the steps
before; its output is checked. The ``dwcp sim`` lines need no node and are run by
tests/test_readme_examples.py."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from consensus.ledger import MigrateVm
from federation.demo.processes import free_base_port
from tests.harness.node import ext4_image, memory_image
from tests.harness.processes import NAMES, NodeProcesses, readme_block, run_dwcp
from tests.harness.waiting import poll_until

ROOT = Path(__file__).resolve().parent.parent
#: The steps the acceptance names; the README must keep showing each.
STEPS = ("federation init", "vm import", "migrate vm1", "status --config", "cancel MIGRATION-ID",
         "policy show", "policy set", "vm delete", "status --request")


def _ok(argv: list[str]) -> str:
    done = run_dwcp(*argv[1:])
    assert done.returncode == 0, f"`{shlex.join(argv)}` exited {done.returncode}:\n" \
                                 f"{done.stdout}{done.stderr}"
    return done.stdout


def _ledger_part(status: str) -> tuple[str, str]:
    """The ledger's height line and the VM table (or "no VMs") of ``dwcp status``."""
    height = re.search(r"^ledger: height \d+", status, re.MULTILINE)
    vms = re.search(r"^(VM {2}.*?|no VMs)\n\n", status, re.MULTILINE | re.DOTALL)
    assert height and vms, status
    return height.group(0), vms.group(1)


class Walk:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.fill: dict[str, str] = {}
        self.nodes: NodeProcesses | None = None
        self.cfg = tmp / "D" / "federation.toml"
        self.deleted = False

    def argv(self, line: str) -> list[str]:
        out = []
        for arg in shlex.split(line, comments=True):
            for placeholder, value in self.fill.items():
                arg = arg.replace(placeholder, value)
            prefix, eq, value = arg.rpartition("=") if arg.startswith("DWCP_") else ("", "", arg)
            if value == "D" or value.startswith("D/"):
                value = str(self.tmp / "D") + value[1:]
            elif value.startswith("~/"):
                value = str(self.tmp) + value[1:]
            elif value.startswith(("/etc/dwcp", "/var/lib/dwcp")):
                value = str(self.tmp) + value
            out.append(prefix + eq + value)
        return out

    def node_argv(self, line: str, name: str) -> list[str]:
        return [a.replace("dc1", name) for a in self.argv(line)[1:]]

    @property
    def running(self) -> NodeProcesses:
        assert self.nodes is not None, "the README starts the nodes before this step"
        return self.nodes

    def step(self, line: str) -> None:
        argv = self.argv(line)
        what = " ".join(argv[1:3])
        if argv[0] == "export":
            for assignment in argv[1:]:
                var, value = assignment.split("=", 1)
                os.environ[var] = value  # tests/conftest.py restores them
        elif argv[1] == "keygen":
            assert re.fullmatch(r"ed25519:[A-Za-z0-9+/]{43}=\n", _ok(argv))
        elif what == "federation init":
            out = _ok([*argv, "--base-port", str(free_base_port(4))])
            assert out == f"{self.cfg}\n"
            # the images the import line names: real data (memory pages, an ext4 disk)
            memory_image(self.cfg.parent / "images" / "mem.img", 2 << 20)
            ext4_image(self.cfg.parent / "images" / "disk.img")
        elif what == "federation check":
            out = _ok(argv)
            assert out.startswith(f"{self.cfg}: federation 'local', 4 DCs: dc1, dc2, dc3, dc4;")
            assert re.search(r"^digest [0-9a-f]{64} ", out, re.MULTILINE) and "warning" not in out
        elif argv[1] == "node":
            self.start_nodes(line)
        elif what == "vm import":
            assert re.fullmatch(r"imported vm1: \d+ pages, epoch 0, running \(request "
                                r"[0-9a-f]{32}\)\n", _ok(argv))
        elif argv[1] == "migrate":
            out = _ok(argv)
            # the migration id first (issue 16 item 6), then the outcome
            assert re.fullmatch(r"migration (vm1-dc1-dc3-[0-9a-f]{8}): vm1 dc1 -> dc3\n"
                                r"migrated vm1 to dc3: \1 committed in \d+ rounds, .*\n",
                                out), out
        elif argv[1] == "status" and "--request" not in argv:
            self.status(argv)
        elif argv[1] == "cancel":
            self.cancel(line)
        elif what == "policy show":
            out = _ok(argv)
            assert re.match(r"v3_percent +0\n", out), out  # (columns as wide as the keys)
        elif what == "policy set":
            out = _ok(argv)
            assert re.match(r"v3_percent +100\n", out), out
        elif what == "vm delete":
            self.delete(argv)
        elif argv[1] == "status":
            assert _ok(argv) == (f"request {self.fill['REQUEST-ID']} of admin: committed "
                                 "(delete-vm vm1), epoch 1\n")
        else:
            raise AssertionError(f"the walk-through has no step for README line {line!r}")

    def start_nodes(self, line: str) -> None:
        logs = self.tmp / "logs"
        logs.mkdir()
        nodes = self.nodes = NodeProcesses(self.cfg, logs)
        for name in NAMES:  # "one per DC"
            nodes.start(name, argv=self.node_argv(line, name))
        for name in NAMES:
            nodes.wait(f"{name} ready", lambda name=name: nodes.ready(name))
        assert (self.tmp / "var" / "lib" / "dwcp" / "dc4" / "node.lock").exists()

    def status(self, argv: list[str]) -> str:
        out = _ok(argv)
        assert out.startswith("DC dc1 of federation local\nledger: height ")
        assert "PROBLEM" not in out
        if not self.deleted:
            assert re.search(r"^vm1 +dc3 +1 +retired +-$", out, re.MULTILINE), out
            assert re.search(r"^vm1-dc1-dc3-\S+ +vm1 +dc1 +dc3 +committed", out, re.MULTILINE)
        return out

    def cancel(self, line: str) -> None:
        nodes = self.running
        # a migration to cancel: vm1 from dc3 to dc4 while dc4 is down, so that it waits
        assert nodes.stop("dc4") == 0
        dc3 = nodes.api("dc3")
        mid = dc3.ok("POST", "/api/migrations", MigrateVm("vm1", "dc4", "dc3", 1))["id"]
        poll_until(lambda: dc3.ok("GET", f"/api/migrations/{mid}").get("ledger") == "begun",
                   "the migration begun in the ledger", 30)
        self.fill["MIGRATION-ID"] = mid
        assert _ok(self.argv(line)) == (f"cancelled {mid}: aborted in the ledger (cancelled by "
                                        "operator); vm1 stays at dc3\n")
        nodes.start("dc4", argv=self.node_argv(self.node_line, "dc4"))
        nodes.wait("dc4 ready", lambda: nodes.ready("dc4"))
        nodes.wait("vm1 running at dc3 again", lambda: nodes.vm_here("dc3", "vm1") == "running")

    def delete(self, argv: list[str]) -> None:
        out = _ok(argv)
        m = re.fullmatch(r"deleted vm1 at epoch 1 \(request ([0-9a-f]{32})\): every DC "
                         r"removes its copy\n", out)
        assert m, out
        self.fill["REQUEST-ID"] = m.group(1)
        self.deleted = True
        copies = [self.tmp / "var" / "lib" / "dwcp" / dc / "vms" / "vm1" for dc in ("dc1", "dc3")]
        self.running.wait("vm1's copies gone at dc3 and dc1",
                          lambda: not any(c.exists() for c in copies))

    node_line = ""


@pytest.mark.processes
def test_the_readme_federation_section_end_to_end(tmp_path: Path) -> None:
    lines = [line for line in readme_block(ROOT, "Running a federation")
             if not line.startswith("dwcp sim ")]
    shown = [" ".join(line.split()[1:3]) for line in lines]
    for step in STEPS:
        assert step in shown, f"the README no longer shows `dwcp {step}`"
    (tmp_path / "etc" / "dwcp").mkdir(parents=True)
    walk = Walk(tmp_path)
    Walk.node_line = next(line for line in lines if line.startswith("dwcp node "))
    status_line = next(line for line in lines if line.startswith("dwcp status --config"))
    try:
        for line in lines:
            walk.step(line)
        # restart every node (in another order), then the README's status line again
        nodes = walk.running
        before = _ledger_part(walk.status(walk.argv(status_line)))
        assert before[1] == "no VMs"
        assert nodes.stop_all() == {n: 0 for n in NAMES}
        for name in reversed(NAMES):
            nodes.start(name, argv=walk.node_argv(Walk.node_line, name))
        nodes.wait("every DC ready again", lambda: all(nodes.ready(n) for n in NAMES))
        after = nodes.wait("dc1's ledger back where it was, VMs and all", lambda: (
            (got := _ledger_part(walk.status(walk.argv(status_line)))) == before and got))
        assert after == before
        assert nodes.stop_all() == {n: 0 for n in NAMES}
    finally:
        if walk.nodes is not None:
            walk.nodes.kill_all()
