"""``dwcp policy show|set`` against real nodes (tests/harness/node.py): the policy goes
through the node API into the ledger of every DC; bad values and an unreachable node
are one-line errors; and the per-VM rendering of the rollout rule."""

from __future__ import annotations

import io
import json
import socket
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import trio

from consensus.authz import Role
from consensus.ledger import SetPolicy, v3_allowed
from federation.api.door import Caller
from federation.api.routes import handle_request
from federation.cli.main import main
from federation.cli.policy import render_policy
from federation.migration.rollout import rollout_bucket
from tests.harness.api import api_import, call
from tests.harness.node import build_node, make_federation, real_vm, running_nodes
from tests.harness.waiting import wait_until


def _dwcp(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


async def dwcp(*args: str) -> tuple[int, str, str]:
    """The real CLI in a worker thread (the nodes run in this thread's trio loop)."""
    return await trio.to_thread.run_sync(lambda: _dwcp(*args))


def _basic(doc: dict[str, Any]) -> dict[str, Any]:
    """The fields of a policy document that the older options set."""
    return {k: doc[k] for k in ("v3_percent", "target_dcs", "target_vms", "kill_switch")}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_policy_show_and_set_through_the_ledger(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")

    async def main_() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1 = nodes["dc1"]
            url = f"http://{dc1.api_host}:{dc1.api_port}"
            rc, out, err = await dwcp("policy", "show", "--api", url)
            assert (rc, err) == (0, "")
            words = [" ".join(line.split()) for line in out.splitlines()]
            assert words[:9] == ["v3_percent 0", "target_dcs -", "target_vms -",
                                 "kill_switch off", "target_regions -", "excluded_dcs -",
                                 "rollback none (only by hand)",
                                 "v3 since set 0 ended, 0 aborted, 0 failed verification", ""]
            assert "no VMs in the ledger" in out
            code, doc = await api_import(dc1, "web", memory, [disk])
            assert code == 201, doc

            rc, out, err = await dwcp("policy", "set", "--v3-percent", "50",
                                      "--target-vms", "web,db", "--api", url)
            assert (rc, err) == (0, "")
            words = [" ".join(line.split()) for line in out.splitlines()]
            assert "v3_percent 50" in words and "target_vms db, web" in words
            assert "web  dc1    " in out and "yes (target_vms)" in out
            want = SetPolicy(50, (), ("db", "web"), False)
            for node in nodes.values():  # every DC's ledger has it
                await wait_until(lambda node=node: node.need_core().replica.ledger.policy == want,
                                 f"the policy in {node.name}'s ledger")

            # fields not given are kept; the answer is the ledger's policy, from any node
            dc3 = nodes["dc3"]
            rc, out, err = await dwcp("policy", "set", "--kill-switch", "on", "--json",
                                      "--api", f"{dc3.api_host}:{dc3.api_port}")
            assert rc == 0, err
            assert _basic(json.loads(out)) == {"v3_percent": 50, "target_dcs": [],
                                               "target_vms": ["db", "web"], "kill_switch": True}
            rc, out, _ = await dwcp("policy", "show", "--json", "--api", url)
            assert rc == 0 and json.loads(out)["kill_switch"] is True
            rc, out, _ = await dwcp("policy", "show", "--api", url)
            assert "no (kill switch)" in out
            rc, out, _ = await dwcp("policy", "set", "--target-vms", "", "--kill-switch", "off",
                                    "--target-dcs", "dc2", "--json", "--api", url)
            assert rc == 0 and _basic(json.loads(out)) == {
                "v3_percent": 50, "target_dcs": ["dc2"], "target_vms": [], "kill_switch": False}

            # errors: one line each, exit 2, and the ledger is unchanged
            before = dc1.need_core().replica.ledger.policy
            rc, _, err = await dwcp("policy", "set", "--target-dcs", "dc9", "--api", url)
            assert (rc, err.strip()) == (
                2, "dwcp policy: target_dcs: dc9 not in the federation (HTTP 409)")
            rc, _, err = await dwcp("policy", "set", "--exclude-dcs", "dc2,dc9", "--api", url)
            assert (rc, err.strip()) == (
                2, "dwcp policy: excluded_dcs: dc9 not in the federation (HTTP 409)")
            rc, _, err = await dwcp("policy", "set", "--target-regions", "Atlantis",
                                    "--api", url)
            assert (rc, err.strip()) == (
                2, "dwcp policy: target_regions: Atlantis is the region of no DC (the "
                   "federation file's regions: none) (HTTP 409)")
            for bad, why in (("101", "got 101"), ("-1", "got -1"), ("half", "got 'half'")):
                rc, _, err = await dwcp("policy", "set", "--v3-percent", bad, "--api", url)
                assert rc == 2 and err.strip().endswith(
                    f"argument --v3-percent: expected an integer 0..100, {why}"), err
            rc, _, err = await dwcp("policy", "set", "--target-vms", "a,,b", "--api", url)
            assert rc == 2 and "expected comma-separated names, got 'a,,b'" in err
            rc, _, err = await dwcp("policy", "set", "--api", url)
            assert (rc, err.strip()) == (2, "dwcp policy: nothing to set: give --v3-percent, "
                                            "--target-dcs, --target-vms or --kill-switch (or "
                                            "another option of `dwcp policy set -h`)")
            port = _closed_port()
            rc, _, err = await dwcp("policy", "show", "--api", f"127.0.0.1:{port}")
            assert rc == 2 and err.startswith(
                f"dwcp policy: cannot reach the node at http://127.0.0.1:{port}: ")
            rc, _, err = await dwcp("policy", "show")
            assert err.strip() == ("dwcp policy: say which node: --api URL, "
                                   "or --config FILE --name DC")
            code, doc = await call(dc1, "POST", "/api/policy", raw=b"\xa1av")
            assert code == 400 and "not a SetPolicy intent" in doc["error"]
            assert dc1.need_core().replica.ledger.policy == before
            code, doc = await call(dc1, "PUT", "/api/policy", raw=b"x")
            assert code == 405

    trio.run(main_)


def test_policy_needs_a_ledger(tmp_path: Path) -> None:
    node = build_node(make_federation(tmp_path / "fed", count=2), "dc1", tmp_path / "data")
    try:
        viewer = Caller("admin", Role.ADMIN, "signature")
        answer = trio.run(handle_request, node, viewer, "GET", "/api/policy", None)
    finally:
        node.close()
    assert answer.status == 409 and b"PBFT needs" in answer.body


def test_render_policy_says_why_each_vm_gets_its_version() -> None:
    names = [f"vm{i}" for i in range(40)]
    low = next(n for n in names if rollout_bucket(n) < 30)
    high = next(n for n in names if rollout_bucket(n) >= 30)
    vms: list[dict[str, Any]] = [{"name": n, "owner": o} for n, o in
           ((low, "dc1"), (high, "dc1"), ("pinned", "dc1"), ("edge", "dc2"))]
    vms.append({"name": "gone", "owner": None})  # only a local copy, not in the ledger
    policy = {"v3_percent": 30, "target_dcs": ["dc2"], "target_vms": ["pinned"],
              "kill_switch": False}
    rows = {ln.split()[0]: ln for ln in render_policy(policy, vms).splitlines()[5:]}
    assert f"yes (bucket {rollout_bucket(low)} < 30)" in rows[low]
    assert rows[high].endswith("only to a DC in target_dcs")
    assert rows["pinned"].endswith("yes (target_vms)")
    assert rows["edge"].endswith("yes (its owner is in target_dcs)")
    assert "gone" not in rows
    # the rendering agrees with the ledger's rule for a migration to a DC outside the lists
    rule = SetPolicy(30, ("dc2",), ("pinned",), False)
    for name, owner in ((low, "dc1"), (high, "dc1"), ("pinned", "dc1"), ("edge", "dc2")):
        assert v3_allowed(rule, name, owner, "dc3") == rows[name].split()[3].startswith("yes")
    policy["kill_switch"] = True
    assert all("no (kill switch)" in ln for ln in
               render_policy(policy, vms[:4]).splitlines()[6:])
    policy.update(kill_switch=False, target_dcs=[])
    assert render_policy(policy, vms[1:2]).splitlines()[-1].endswith("no")
