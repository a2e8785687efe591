"""v3 (HDE over AMST) between real ``dwcp node`` processes on loopback: the rollout policy
set through the API, a migration with the writer running whose target images equal the
source's at the fence, and a kill -9 of the target in the middle of a v3 round."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from consensus.ledger import DeleteVm, SetPolicy
from federation.api.client import import_vm, migrate_request
from federation.vms.sealed_image import is_sealed
from tests.harness.node import ext4_image, image_hashes, memory_image
from tests.harness.processes import node_processes, vm_dir, writer_mismatches


def test_v3_between_processes_then_kill_the_target_mid_round(tmp_path: Path) -> None:
    memory = memory_image(tmp_path / "memory.img", 24 << 20)
    disk = ext4_image(tmp_path / "disk.img")
    logical = memory.stat().st_size + disk.stat().st_size
    with node_processes(tmp_path, {"dc1": ["vm1=300:3", "vm2=300:3"]}) as nodes:
        dc1 = nodes.api("dc1")
        code, bad = dc1.call("POST", "/api/policy", DeleteVm("vm1"))
        assert code == 400 and "not a SetPolicy intent" in bad["error"]
        policy = dc1.ok("POST", "/api/policy", SetPolicy(100, (), (), False))
        assert policy["v3_percent"] == 100 and policy["kill_switch"] is False
        for vm in ("vm1", "vm2"):
            import_vm(dc1, vm, str(memory), (str(disk),))

        mid = dc1.ok("POST", "/api/migrations", migrate_request(dc1, "vm1", "dc3"))["id"]
        done = nodes.wait("vm1 committed", lambda: (
            (m := dc1.ok("GET", f"/api/migrations/{mid}")).get("outcome") and m))
        out = done["outcome"]
        assert out["outcome"] == "committed", out
        assert done["version"] == 3 and done["data_plane"] == {"v3": out["rounds"]}
        assert out["bytes_sent"] >= logical and 0 < out["wire_bytes"] < out["bytes_sent"]
        nodes.wait("vm1 running at dc3", lambda: nodes.vm_here("dc3", "vm1") == "running")
        src, dst = vm_dir(nodes, "dc1", "vm1"), vm_dir(nodes, "dc3", "vm1")
        assert image_hashes(dst) == image_hashes(src)
        # dwcp node seals what it stores: dc3's copy is sealed, under dc3's own key
        assert all(is_sealed(p) for p in dst.glob("*.img"))
        assert writer_mismatches(dst, src / "writer.log") == []
        code, text = dc1.request("GET", "/metrics")
        assert code == 200
        families = {m.name: m for m in text_string_to_metric_families(text.decode())}
        rounds = {s.labels["version"]: s.value
                  for s in families["dwcp_transfer_version_rounds"].samples}
        assert rounds == {"v1": 0, "v3": out["rounds"]}

        # kill -9 the target while a v3 round is under way: one owner, its image intact
        mid2 = dc1.ok("POST", "/api/migrations", migrate_request(dc1, "vm2", "dc4"))["id"]
        nodes.wait("a v3 round under way", lambda: dc1.ok(
            "GET", f"/api/migrations/{mid2}").get("phase") in ("precopy", "fenced", "final"))
        nodes.procs["dc4"].kill()
        nodes.procs["dc4"].wait()
        nodes.start("dc4")
        nodes.wait("dc4 back", lambda: nodes.ready("dc4"))
        agreed = nodes.wait("one owner in every ledger", lambda: (
            (a := nodes.agreed("vm2")) and a["owner_epoch"][0] in ("dc1", "dc4")
            and "outcome" in dc1.ok("GET", f"/api/migrations/{mid2}") and a), timeout=120)
        owner = agreed["owner_epoch"][0]
        nodes.wait(f"vm2 running at {owner}", lambda: nodes.vm_here(owner, "vm2") == "running")
        writer_log = vm_dir(nodes, "dc1", "vm2") / "writer.log"
        nodes.stop_all()
        assert writer_mismatches(vm_dir(nodes, owner, "vm2"), writer_log) == []
