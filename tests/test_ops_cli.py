"""The operator's CLI against real ``dwcp node`` processes on loopback: import a VM of
real data at dc1, migrate it to dc3 with its writer running, check the target's images
against the source's at the fence and every ledger; kill -9 a node mid-migration and
check the migration ends with one owner everywhere and that owner's image intact.

The writer is a test tool, not an API field: dc1's node runs as the demo's writer node
(:mod:`federation.demo.writer_node`), which gives the named VMs a page writer."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation.api.client import KEY_ENV, import_vm, migrate_request
from federation.cli.ops import render_progress, render_status
from tests.harness.node import ext4_image, image_hashes, memory_image
from tests.harness.processes import (
    DWCP_MAIN,
    NAMES,
    NodeProcesses,
    node_processes,
    vm_dir,
    writer_mismatches,
)


def dwcp(*args: str, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DWCP_MAIN, *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | (env or {}))


def test_import_migrate_status_through_the_cli(tmp_path: Path) -> None:
    memory = memory_image(tmp_path / "memory.img", 8 << 20)
    disk = ext4_image(tmp_path / "disk.img")
    with node_processes(tmp_path, {"dc1": ["vm1=300"]}) as nodes:
        at = ("--config", str(nodes.cfg), "--name", "dc1")
        r = dwcp("vm", "import", "vm1", "--memory", str(memory), "--disk", str(disk), *at)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("imported vm1: ")
        r = dwcp("migrate", "vm1", "--to", "dc3", *at)
        assert r.returncode == 0, r.stderr
        first, last = r.stdout.splitlines()
        assert re.fullmatch(r"migration vm1-dc1-dc3-\w+: vm1 dc1 -> dc3", first), r.stdout
        assert last.startswith("migrated vm1 to dc3: ") and "committed" in last
        assert first.split()[1].rstrip(":") in last, "the id printed first is the one ended"
        progress = r.stderr.splitlines()
        assert progress and all(" round " in line for line in progress), r.stderr
        nodes.wait("vm1 running at dc3", lambda: nodes.vm_here("dc3", "vm1") == "running")
        src, dst = vm_dir(nodes, "dc1", "vm1"), vm_dir(nodes, "dc3", "vm1")
        assert image_hashes(dst) == image_hashes(src)  # the source's images at the fence
        assert writer_mismatches(dst, src / "writer.log") == []
        agreed = nodes.wait("ledgers agree", lambda: nodes.agreed("vm1"))
        assert agreed["owner_epoch"] == ("dc3", 1)

        r = dwcp("status", "--config", str(nodes.cfg), "--name", "dc3")
        assert r.returncode == 0, r.stderr
        assert "ledger: height" in r.stdout and "vm1  dc3" in r.stdout
        r = dwcp("status", "--json", "--api", nodes.api("dc2").url)
        assert json.loads(r.stdout)["dc"] == "dc2"
        r = dwcp("vms", "--api", nodes.api("dc4").url)
        assert r.returncode == 0 and "vm1  dc3    1" in r.stdout

        code, raw = nodes.api("dc3").request("GET", "/metrics")
        assert code == 200
        text = raw.decode()
        # without a key the CLI says what is missing, and an unsigned request is refused
        r = dwcp("vms", "--api", nodes.api("dc4").url, env={KEY_ENV: ""})
        assert r.returncode == 2 and "no operator key: give --key FILE or set " \
            "DWCP_OPERATOR_KEY" in r.stderr
        if shutil.which("curl"):
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"{nodes.api('dc3').url}/metrics"], capture_output=True,
                               text=True, timeout=30)
            assert r.stdout == "401"
        families = {f.name: f for f in text_string_to_metric_families(text)}
        migs = {tuple(sorted(s.labels.items())): s.value
                for s in families["dwcp_migrations"].samples}
        assert migs[(("outcome", "committed"), ("role", "target"))] == 1

        r = dwcp("migrate", "ghost", "--to", "dc2", *at)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        assert "ghost" in r.stderr
        # dc1 keeps a retained copy of vm1; dc3 owns vm1: nothing of it to purge there
        r = dwcp("vm", "purge", "vm1", "--config", str(nodes.cfg), "--name", "dc3")
        assert r.returncode == 2 and "belongs to this DC in the ledger" in r.stderr
        r = dwcp("vm", "purge", "vm1", *at)
        assert r.returncode == 0 and r.stdout.startswith("purged vm1: freed "), r.stderr
        assert not src.exists()
        assert nodes.stop_all() == {n: 0 for n in NAMES}


def _kill_mid_migration(tmp_path: Path, victim: str, rng: random.Random) -> str:
    """Returns the owner the ledgers agree on afterwards."""
    memory = memory_image(tmp_path / "memory.img", 48 << 20)
    disk = ext4_image(tmp_path / "disk.img")
    with node_processes(tmp_path, {"dc1": ["vm1=300:3"]}) as nodes:
        dc1 = nodes.api("dc1")
        import_vm(dc1, "vm1", str(memory), (str(disk),))
        mid = dc1.ok("POST", "/api/migrations", migrate_request(dc1, "vm1", "dc3"))["id"]
        # a random moment of pre-copy: after some bytes, before the end
        total = (memory.stat().st_size + disk.stat().st_size)
        cut = rng.uniform(0.05, 0.8) * total
        nodes.wait("pre-copy under way", lambda: _received(nodes, mid) >= cut)
        in_flight = _received(nodes, mid) != float("inf")
        nodes.procs[victim].kill()
        nodes.procs[victim].wait()
        nodes.start(victim)
        nodes.wait(f"{victim} back", lambda: nodes.ready(victim))
        agreed = nodes.wait("one owner in every ledger", lambda: (
            (a := nodes.agreed("vm1")) and a["owner_epoch"][0] in ("dc1", "dc3")
            and all(_ended(nodes, n, mid) for n in ("dc1", "dc3")) and a), timeout=120)
        owner = agreed["owner_epoch"][0]
        nodes.wait(f"vm1 running at {owner}", lambda: nodes.vm_here(owner, "vm1") == "running")
        src = vm_dir(nodes, "dc1", "vm1")
        # the owner's image holds every page the writer wrote (until the fence, if any)
        nodes.stop_all()
        assert writer_mismatches(vm_dir(nodes, owner, "vm1"), src / "writer.log") == []
        assert in_flight or owner == "dc3", "the migration ended before the kill"
        return owner


def _received(nodes: NodeProcesses, mid: str) -> float:
    """Bytes dc3 wrote for ``mid`` so far (infinite once the migration ended)."""
    code, m = nodes.api("dc3").call("GET", f"/api/migrations/{mid}")
    if code != 200:
        return 0
    return float("inf") if "outcome" in m else m.get("received_bytes", 0)


def _ended(nodes: NodeProcesses, dc: str, mid: str) -> bool:
    code, m = nodes.api(dc).call("GET", f"/api/migrations/{mid}")
    return code == 200 and m.get("ledger") in ("committed", "aborted") and "outcome" in m


def test_kill_source_mid_migration(tmp_path: Path) -> None:
    # killed in pre-copy, the source restarts, aborts in the ledger and runs the VM again
    assert _kill_mid_migration(tmp_path, "dc1", random.Random(1)) == "dc1"


@pytest.mark.parametrize("run", range(10))
def test_kill_source_or_target_at_random_moments(tmp_path: Path, run: int) -> None:
    rng = random.Random(int(os.environ.get("DWCP_KILL_SEED", "0")) * 100 + run)
    _kill_mid_migration(tmp_path, rng.choice(["dc1", "dc3"]), rng)


def test_progress_and_status_rendering() -> None:
    line = render_progress({"phase": "precopy", "round": 2, "bytes_sent": 512 << 10,
                            "total_bytes": 1 << 20, "wire_bytes": 520 << 10,
                            "dirty_rate": 120.0, "eta": 1.5})
    assert line.startswith("precopy   round  2 [############------------]")
    assert "512.0 KiB" in line and "dirty 120 pages/s" in line and "eta 1.5s" in line
    assert "512.0 KiB, 128 pages (wire" in render_progress({"phase": "precopy", "round": 1,
                                                             "bytes_sent": 512 << 10,
                                                             "pages_sent": 128})
    assert "eta ?" in render_progress({"phase": "begun", "eta": None})
    assert ", preparing: 4096 pages (wire" in render_progress(
        {"phase": "precopy", "round": 1, "pages_sent": 0, "progress": {"prepared": 4096}})
    doc = {"dc": "dc1", "federation": "f", "data_plane": "v1", "ledger": {"unavailable": "no"},
           "members": {"dc2": "alive"},
           "links": {"dc2": {"connected": True, "rtt_ms": 1.25, "loss": 0.0,
                             "bandwidth_mbps": None, "mode": "datacenter"}},
           "routes": {"control": {"dc2": ["dc1", "dc2"]}, "bulk": {"dc2": None}},
           "vms": [], "migrations": []}
    text = render_status(doc)
    assert "dc2   alive   up    1.2" in text and "datacenter  dc2" in text
    assert "no VMs" in text and "no migrations" in text
    base = {"vm": "web", "source": "dc1", "target": "dc3", "ledger": "begun",
            "phase": "precopy", "round": 1, "bytes_sent": 1 << 20}
    doc["migrations"] = [
        {"id": "m-relayed", **base, "version": 3, "streams": {"dc2": 4, "direct": 1},
         "data_plane": {"v3": 2}},
        {"id": "m-v1", **base, "version": 1, "streams": {}, "data_plane": {"v1": 2}},
        {"id": "m-fallback", **base, "version": 3, "streams": {"direct": 4},
         "data_plane": {"v3": 1, "v1": 1}},
        {"id": "m-none", **base, "version": 1, "streams": {}, "data_plane": {}},
        {"id": "m-target", **base, "role": "target", "downtime_ms": 212.4},
    ]
    rows = {line.split()[0]: line.rsplit(None, 1)[0] if line.endswith(" -") else line
            for line in render_status(doc).splitlines() if line.startswith("m-")}
    assert rows["m-relayed"].endswith("1.0 MiB  via dc2, direct")
    assert rows["m-v1"].endswith("control link") and rows["m-target"].endswith(" 212 ms")
    assert rows["m-fallback"].endswith("direct, control link") and rows["m-none"].endswith("-")
    assert "REASONS" not in render_status(doc)
    doc["migrations"].append({"id": "m-gone", **base, "ledger": "aborted", "phase": "aborted",
                              "reason": "target dc3 unreachable since 12:01:07 (link down "
                                        "for 30 s)"})
    assert render_status(doc).endswith(
        "REASONS\n  m-gone: aborted: target dc3 unreachable since 12:01:07 (link down for 30 s)")
