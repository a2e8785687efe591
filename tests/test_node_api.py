"""The node's HTTP API (federation.api.http) over real sockets: every route, its errors, and
/metrics as Prometheus text that prometheus_client's own parser reads."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from federation.api.http import MAX_BODY, ApiError, _field, _json_body
from mesh.runtime.log import JsonLog
from tests.harness.api import call, http
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
            assert await call(dc1, "GET", "/ready") == (200, {"ready": True, "reason": "ready"})
            code, doc = await call(dc1, "POST", "/api/vms", {
                "name": "web", "memory": str(memory), "disks": [str(disk)]})
            assert code == 201 and doc["state"] == "running" and doc["epoch"] == 0
            assert [n for n, _ in doc["layout"]] == ["memory", "disk-0"]
            code, doc = await call(dc1, "POST", "/api/vms", {
                "name": "web", "memory": str(memory)})
            assert code == 409 and "already registered" in doc["error"]

            code, mig = await call(dc1, "POST", "/api/migrations", {"vm": "web", "to": "dc2"})
            assert code == 202
            code, m = await call(dc1, "GET", f"/api/migrations/{mig['id']}")
            assert code == 200 and m["vm"] == "web" and m["target"] == "dc2"
            await wait_outcome(dc1, mig["id"])  # the API answers from the node's own record
            code, m = await call(dc1, "GET", f"/api/migrations/{mig['id']}")
            assert code == 200 and m["outcome"]["outcome"] == "committed", m
            assert m["ledger"] == "committed" and m["bytes_sent"] == m["total_bytes"]
            await wait_vm(dc2, "web", "running")
            await wait_vm(dc1, "web", "retired")

            status, headers, body = await http(
                dc1, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            m1 = _samples(body.decode())
            assert m1[("dwcp_migrations_total", (("outcome", "committed"),
                                                 ("role", "source")))] == 1
            sent = m1[("dwcp_transfer_bytes_total", (("direction", "out"), ("kind", "logical")))]
            wire = m1[("dwcp_transfer_bytes_total", (("direction", "out"), ("kind", "wire")))]
            assert sent == memory.stat().st_size + disk.stat().st_size and wire > sent
            assert m1[("dwcp_members", (("state", "alive"),))] == 3
            assert m1[("dwcp_links_connected", ())] == 3
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

    trio.run(main)


def test_bad_requests_get_clear_errors(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            n = nodes["dc1"]
            assert (await call(n, "GET", "/nope"))[0] == 404
            assert (await call(n, "DELETE", "/api/status"))[0] == 405
            assert (await call(n, "GET", "/api/migrations/m-unknown"))[0] == 404
            code, doc = await call(n, "POST", "/api/migrations", raw=b"{not json")
            assert code == 400 and "not JSON" in doc["error"]
            code, doc = await call(n, "POST", "/api/migrations", [1, 2])
            assert code == 400 and "JSON object" in doc["error"]
            code, doc = await call(n, "POST", "/api/migrations", {"vm": "x"})
            assert (code, doc["error"]) == (400, "to: required")
            code, doc = await call(n, "POST", "/api/migrations", {"vm": 5, "to": "dc2"})
            assert (code, doc["error"]) == (400, "vm: expected str, got int")
            code, doc = await call(n, "POST", "/api/migrations", {"vm": "ghost", "to": "dc2"})
            assert code == 409 and "ghost" in doc["error"]
            code, doc = await call(n, "POST", "/api/migrations", {"vm": "ghost", "to": "dc1"})
            assert code == 409 and "not another DC" in doc["error"]
            code, doc = await call(n, "POST", "/api/vms",
                                   {"name": "v", "memory": str(tmp_path / "missing.img")})
            assert code == 409 and "missing.img" in doc["error"]
            code, doc = await call(n, "POST", "/api/vms", {"name": "../x", "memory": __file__})
            assert code == 409 and "VM name" in doc["error"]
            code, doc = await call(n, "POST", "/api/vms", raw=b" " * (MAX_BODY + 1))
            assert code == 413
            status, _, body = await http(n, b"GARBAGE\r\n\r\n")
            assert status == 400 and b"error" in body
            # keep-alive: two requests on one connection
            stream = await trio.open_tcp_stream(n.api_host, n.api_port)
            async with stream:
                req = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
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
                                   {"vm": "a", "to": "dc2"})
            assert code == 409 and "PBFT needs" in doc["error"]
            _, text = await call(nodes["dc1"], "GET", "/metrics")
            names = {f.name for f in text_string_to_metric_families(text)}
            assert "dwcp_members" in names and "dwcp_ledger_height" not in names

    trio.run(main)


@given(st.binary(max_size=200))
def test_json_body_parser_never_crashes(data: bytes) -> None:
    try:
        doc = _json_body(data)
    except ApiError as exc:
        assert exc.status == 400 and str(exc)
        return
    assert isinstance(doc, dict)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
                     max_leaves=8)


@given(st.dictionaries(st.sampled_from(["vm", "to", "disks", "v3_percent"]), _json),
       st.sampled_from([str, list, float, int]))
def test_field_checker_names_the_field(doc: dict[str, Any], kind: type) -> None:
    for name in ("vm", "to", "disks", "v3_percent"):
        try:
            value = _field(doc, name, kind)
        except ApiError as exc:
            assert exc.status == 400 and str(exc).startswith(f"{name}: ")
            continue
        assert isinstance(value, kind) and not isinstance(value, bool)


pytestmark = pytest.mark.timeout(120)


class _RefusingNode:
    """Just enough of a node for the HTTP layer: every operation is refused, and any
    other use of the node (a status read) fails loudly, which the server answers 500."""

    log = JsonLog("test", io.StringIO())

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the test node has no {name}")

    async def import_vm(self, *args: Any) -> Any:
        from federation.node.errors import NodeError

        raise NodeError("refused by the test node")

    migrate = import_vm


async def _exchange(raw: bytes) -> bytes:
    from trio.testing import memory_stream_pair

    from federation.api.http import _serve_connection

    client, server = memory_stream_pair()
    out = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_connection, _RefusingNode(), server)
        await client.send_all(raw)
        await client.send_eof()
        with trio.fail_after(5):
            while chunk := await client.receive_some(65536):
                out += chunk
    return out


_requests = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda mp, b, extra: (f"{mp[0]} {mp[1]} HTTP/1.1\r\nhost: x\r\n"
                              f"content-length: {len(b)}\r\n{extra}\r\n").encode() + b,
        # routes that need no live node (the test node refuses every operation)
        st.tuples(st.sampled_from(["GET", "POST", "PUT", "BREW"]),
                  st.sampled_from(["/health", "/nope", "/api/migrations", "/x?y=1"]))
        | st.just(("POST", "/api/vms")),
        st.binary(max_size=200),
        st.sampled_from(["", "connection: close\r\n", "transfer-encoding: chunked\r\n"]),
    ),
)


@given(_requests)
def test_the_server_answers_any_bytes_with_http_or_closes(raw: bytes) -> None:
    out = trio.run(_exchange, raw)
    if out:  # every answer is HTTP with a JSON error or an expected body, never a traceback
        assert out.startswith(b"HTTP/1.1 "), out[:80]
        status = int(out.split(b" ", 2)[1])
        assert status in (200, 400, 404, 405, 409, 413, 500), out[:200]
        assert status != 500 or b"the test node has no" in out
        if status >= 400:
            assert b'{"error":' in out
