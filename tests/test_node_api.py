"""The node's HTTP API (federation.api.http) over real sockets: every route, its errors, and
/metrics as Prometheus text that prometheus_client's own parser reads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from consensus.ledger import DeleteVm, ImportVm, MigrateVm
from federation.api.http import MAX_BODY
from federation.migration.vocabulary import record_key
from federation.node.heap_report import node_caches
from mesh.links.control_plane import statement_cache_size
from mesh.runtime.sqlite_store import StoreFull
from tests.harness.api import api_import, api_migrate, call, host, http, request
from tests.harness.node import make_federation, real_vm, running_nodes, wait_outcome, wait_vm


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_routes_metrics_and_a_migration(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1, dc2 = nodes["dc1"], nodes["dc2"]
            assert await call(dc1, "GET", "/health") == (200, {"status": "ok"})
            assert await call(dc1, "GET", "/ready") == (
                200, {"ready": True, "reason": "ready", "problems": []})
            code, doc = await api_import(dc1, "web", memory, [disk])
            assert code == 201 and doc["state"] == "running" and doc["epoch"] == 0
            assert [n for n, _ in doc["layout"]] == ["memory", "disk-0"]
            code, doc = await call(dc1, "POST", "/api/vms",
                                   ImportVm("web", "dc1", str(memory)))
            assert code == 409 and "already registered" in doc["error"]
            code, doc = await call(dc1, "POST", "/api/imports",
                                   ImportVm("web", "dc1", str(memory)))
            assert code == 409 and "already exists here" in doc["error"]

            code, mig = await api_migrate(dc1, "web", "dc2")
            assert code == 202
            code, m = await call(dc1, "GET", f"/api/migrations/{mig['id']}")
            assert code == 200 and m["vm"] == "web" and m["target"] == "dc2"
            await wait_outcome(dc1, mig["id"])  # the API answers from the node's own record
            code, m = await call(dc1, "GET", f"/api/migrations/{mig['id']}")
            assert code == 200 and m["outcome"]["outcome"] == "committed", m
            assert m["ledger"] == "committed" and m["bytes_sent"] == m["total_bytes"]
            await wait_vm(dc2, "web", "running")
            await wait_vm(dc1, "web", "retired")

            status, headers, body = await http(dc1, request(dc1, "GET", "/metrics"))
            assert status == 200 and headers["content-type"].startswith("text/plain")
            m1 = _samples(body.decode())
            assert m1[("dwcp_migrations_total", (("outcome", "committed"),
                                                 ("role", "source")))] == 1
            sent = m1[("dwcp_transfer_bytes_total", (("direction", "out"), ("kind", "logical")))]
            wire = m1[("dwcp_transfer_bytes_total", (("direction", "out"), ("kind", "wire")))]
            assert sent == memory.stat().st_size + disk.stat().st_size and wire > sent
            assert m1[("dwcp_members", (("state", "alive"),))] == 3
            assert m1[("dwcp_links_connected", ())] == 3
            assert m1[("dwcp_trio_tasks", ())] > 10  # every task of the process's trio run
            assert m1[("dwcp_ledger_vms", (("owner", "dc2"),))] == 1
            assert m1[("dwcp_ledger_height", ())] >= 3
            assert m1[("dwcp_vms", (("state", "retired"),))] == 1
            assert ("dwcp_view_changes_total", (("event", "completed"),)) in m1
            _, text = await call(dc2, "GET", "/metrics")
            m2 = _samples(text)
            assert m2[("dwcp_transfer_bytes_total", (("direction", "in"),
                                                     ("kind", "logical")))] == sent
            assert m2[("dwcp_migrations_total", (("outcome", "committed"),
                                                 ("role", "target")))] == 1

            code, doc = await call(dc2, "GET", "/api/status")
            assert code == 200 and doc["dc"] == "dc2"
            assert set(doc["members"]) == {"dc1", "dc3", "dc4"}
            assert doc["ledger"]["height"] >= 3 and doc["ledger"]["view"] == 0
            pages = (memory.stat().st_size + disk.stat().st_size) // 4096
            assert doc["vms"] == [{"name": "web", "owner": "dc2", "epoch": 1, "migrating": None,
                                   "here": "running", "pages": pages}]
            assert doc["migrations"][0]["id"] == mig["id"]
            assert doc["data_plane"].startswith("v1")
            _, src = await call(dc1, "GET", "/api/status")  # the round was a bandwidth sample
            assert src["links"]["dc2"]["bandwidth_mbps"] > 0
            assert set(doc["routes"]) == {"control", "bulk"}
            code, vms = await call(nodes["dc3"], "GET", "/api/vms")
            assert code == 200 and vms[0]["owner"] == "dc2" and vms[0]["here"] is None
            # one VM, read from its own record and directory (not a listing of the fleet)
            assert await call(nodes["dc3"], "GET", "/api/vms/web") == (200, vms[0])
            assert await call(dc1, "GET", "/api/vms/web") == (200, {
                "name": "web", "owner": "dc2", "epoch": 1, "migrating": None,
                "here": "retired", "pages": pages})
            code, doc = await call(dc1, "GET", "/api/vms/nobody")
            assert code == 404 and "no VM 'nobody'" in doc["error"]
            code, doc = await call(dc1, "GET", "/api/vms/..%2Fx")
            assert code == 404
            # the reads that list every VM do it in a worker thread, not on the event loop
            # (about 1 ms per VM from disk: a fleet's listing held up keepalives and PBFT)
            threads: list[int] = []
            listing = dc1.backend.list_vms

            def spy() -> Any:
                threads.append(threading.get_ident())
                return listing()

            dc1.backend.list_vms = spy  # type: ignore[method-assign]
            for path in ("/api/status", "/api/vms", "/metrics"):
                assert (await call(dc1, "GET", path))[0] == 200
            assert len(threads) >= 3 and threading.get_ident() not in threads

            # a node of 4 DCs remembers 1,024 verified statements, not 64 DCs' worth
            assert dc1.control.statements.cache_max == statement_cache_size(4) == 1024
            # past the node's bounds an ended session goes (federation.node.assembly,
            # ENDED_KEEP_*): its view is the ledger's record, its outcome still counted
            assert dc1.rounds.counters.paths[mig["id"]]
            # what heap_report says of the node's bounded caches: [entries, cap, bytes]
            caches = node_caches(dc1)
            assert caches["ledger_migrations"][:2] == [1, None]
            assert caches["ended_sessions"][:2] == [1, 1000]
            assert caches["verifier"][1] == 8192 and caches["statements"][1] == 1024
            for name, (entries, cap, size) in caches.items():
                assert entries is not None and size is not None
                assert cap is None or entries <= cap, name
                assert (size > 100 * entries) if entries else size < 10_000, (name, size)
            # ... and its persisted record is deleted once the stable checkpoint holds
            # the decision (a restart recovers from it); a delete that fails (a full
            # disk) is tried again at the next sweep, the node carries on
            key = record_key(mig["id"])
            assert dc1.store.get(key) is not None
            assert dc1.core is not None and dc1.core.replica.low == 0
            assert await dc1.forget_ended(keep_for=0, keep_most=0) == [mig["id"]]
            assert dc1.store.get(key) is not None and dc1.records_dropped == 0
            assert dc2.store.get(key) is not None
            assert await dc2.forget_ended(keep_for=0, keep_most=0) == [mig["id"]]
            policy = dc1.core.replica.ledger.policy
            for _ in range(200):  # a checkpoint every 128 sequence numbers
                if min(n.core.replica.low for n in (dc1, dc2) if n.core) > 0:
                    break
                assert (await call(dc1, "POST", "/api/policy", policy))[0] == 200
            deleting = dc1.store.delete_many

            def full(keys: list[str]) -> None:
                raise StoreFull("disk full")

            dc1.store.delete_many = full  # type: ignore[method-assign]
            assert await dc1.forget_ended(keep_for=0, keep_most=0) == []
            assert dc1.store.get(key) is not None and dc1.records_dropped == 0
            dc1.store.delete_many = deleting  # type: ignore[method-assign]
            assert await dc1.forget_ended(keep_for=0, keep_most=0) == []
            assert dc1.store.get(key) is None and dc1.records_dropped == 1
            assert dc1.store.keys(record_key("")) == []
            assert await dc2.forget_ended(keep_for=0, keep_most=0) == []
            assert dc2.store.get(key) is None
            assert mig["id"] not in dc1.rounds.counters.paths
            assert dc1.core is not None and dc1.core.sessions == {}
            code, m = await call(dc1, "GET", f"/api/migrations/{mig['id']}")
            assert code == 200 and m["ledger"] == "committed" and "outcome" not in m
            _, text = await call(dc1, "GET", "/metrics")
            assert _samples(text)[("dwcp_migrations_total", (("outcome", "committed"),
                                                              ("role", "source")))] == 1
            code, doc = await call(dc1, "GET", "/api/status")
            assert doc["migrations_total"] == 1 and doc["migrations"][0]["id"] == mig["id"]

    trio.run(main)


def test_bad_requests_get_clear_errors(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.img"
    outside.write_bytes(b"x" * 4096)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            n = nodes["dc1"]
            assert (await call(n, "GET", "/nope"))[0] == 404
            assert (await call(n, "PUT", "/api/status", raw=b"x"))[0] == 405
            assert (await call(n, "GET", "/api/migrations/m-unknown"))[0] == 404
            code, doc = await call(n, "POST", "/api/migrations", raw=b"{not cbor")
            assert code == 400 and "not a MigrateVm intent" in doc["error"]
            code, doc = await call(n, "POST", "/api/migrations", DeleteVm("x"))
            assert code == 400 and "not a MigrateVm intent" in doc["error"]
            code, doc = await call(n, "POST", "/api/migrations",
                                   MigrateVm("ghost", "dc2", "dc1", 0))
            assert code == 409 and "ghost" in doc["error"]
            code, doc = await call(n, "POST", "/api/migrations",
                                   MigrateVm("ghost", "dc1", "dc1", 0))
            assert code == 409 and "not another DC" in doc["error"]
            missing = str(tmp_path / "missing.img")
            code, doc = await call(n, "POST", "/api/imports", ImportVm("v", "dc1", missing))
            assert code == 403 and doc["error"] == f"memory: {missing}: no such file"
            code, doc = await call(n, "POST", "/api/imports",
                                   ImportVm("v", "dc1", str(outside)))
            assert code == 403 and "is not a file under this node's import" in doc["error"]
            code, doc = await call(n, "POST", "/api/imports", ImportVm("v", "dc2", missing))
            assert code == 400 and "asked to import at 'dc2'" in doc["error"]
            code, doc = await call(n, "POST", "/api/imports", ImportVm("../x", "dc1", missing))
            assert code == 409 and "VM name" in doc["error"]
            code, doc = await call(n, "POST", "/api/vms", ImportVm("v", "dc1", missing))
            assert code == 409 and "not staged here" in doc["error"]
            code, doc = await call(n, "POST", "/api/vms", raw=b" " * (MAX_BODY + 1))
            assert code == 413
            status, _, body = await http(n, b"GARBAGE\r\n\r\n")
            assert status == 400 and b"error" in body
            # keep-alive: two requests on one connection
            stream = await trio.open_tcp_stream(n.api_host, n.api_port)
            async with stream:
                req = f"GET /health HTTP/1.1\r\nhost: {host(n)}\r\n\r\n".encode()
                await stream.send_all(req + req)
                seen = b""
                with trio.fail_after(10):
                    while seen.count(b'{"status":"ok"}') < 2:
                        seen += await stream.receive_some(65536)
            # nothing above changed the ledger
            assert n.need_core().replica.ledger.vms == {}

    trio.run(main)


def test_ready_needs_a_quorum_and_a_ledger(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    small = make_federation(tmp_path / "small", count=2)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data", names=("dc1",)) as nodes:
            code, doc = await call(nodes["dc1"], "GET", "/ready")
            assert code == 503 and "a quorum is 3" in doc["reason"]
        async with running_nodes(small, tmp_path / "data2", names=("dc1", "dc2")) as nodes:
            code, doc = await call(nodes["dc1"], "GET", "/ready")
            assert code == 503 and "PBFT needs" in doc["reason"]
            code, doc = await call(nodes["dc1"], "GET", "/api/status")
            assert "PBFT needs" in doc["ledger"]["unavailable"] and doc["migrations"] == []
            code, doc = await call(nodes["dc1"], "POST", "/api/migrations",
                                   MigrateVm("a", "dc2", "dc1", 0))
            assert code == 409 and "PBFT needs" in doc["error"]
            _, text = await call(nodes["dc1"], "GET", "/metrics")
            names = {f.name for f in text_string_to_metric_families(text)}
            assert "dwcp_members" in names and "dwcp_ledger_height" not in names

    trio.run(main)


pytestmark = pytest.mark.timeout(120)


async def test_trio_task_count_sees_tasks_start_and_end() -> None:
    import trio.testing

    from federation.node.metrics import trio_task_count

    before = trio_task_count()
    assert before is not None and before >= 2  # the root task and this test's task
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert trio_task_count() == before + 5
        nursery.cancel_scope.cancel()
    assert trio_task_count() == before


def test_trio_task_count_is_none_outside_trio() -> None:
    from federation.node.metrics import trio_task_count

    assert trio_task_count() is None
