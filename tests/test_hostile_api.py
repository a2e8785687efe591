"""Hostile requests to a node's API (issue 15 items 1, 2, 7): nothing gets in without an
operator's fresh signature of the right role, a web page can neither change state nor
read through another name, a slow or greedy client is cut off, any bytes at all get a
4xx or a closed connection, and the node keeps serving throughout.

Against real nodes on loopback (tests/harness/node.py) where the ledger matters, and
against the server alone (:class:`federation.api.http.ApiServer` over memory streams,
on trio's mock clock) for deadlines, caps and fuzzing."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.ledger import DeleteVm, ImportVm, SetPolicy
from federation import config
from federation.api import http as api_http
from federation.api.door import Door
from federation.api.http import ApiServer
from federation.api.limits import DEFAULT_LIMITS, MAX_BODY, REQUEST_DEADLINE, ApiLimits
from federation.api.sessions import LINK_TTL
from mesh import wire
from mesh.runtime.log import JsonLog
from tests.harness.api import (
    api_import,
    api_migrate,
    call,
    dashboard_link,
    host,
    http,
    request,
    sign_header,
)
from tests.harness.node import add_operator, make_federation, real_vm, running_nodes

pytestmark = pytest.mark.timeout(180)


def _federation(tmp_path: Path) -> Path:
    cfg = make_federation(tmp_path / "fed")
    add_operator(cfg, "val", "viewer")
    add_operator(cfg, "otto", "operator")
    return cfg


def test_signatures_roles_replays_and_web_pages(tmp_path: Path) -> None:
    cfg = _federation(tmp_path)
    memory, disk = real_vm(tmp_path / "vm")

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            n = nodes["dc1"]
            # unsigned: only the probes answer
            assert (await call(n, "GET", "/health", sign=False))[0] == 200
            assert (await call(n, "GET", "/ready", sign=False))[0] == 200
            for method, path in (("GET", "/api/status"), ("GET", "/metrics"), ("GET", "/"),
                                 ("GET", "/api/vms"), ("GET", "/api/policy")):
                code, doc = await call(n, method, path, sign=False)
                assert code == 401 and "needs an operator's signed request" in doc["error"]
            code, doc = await call(n, "POST", "/api/policy", SetPolicy(100, (), (), True),
                                   sign=False)
            assert code == 401

            # replayed: the same signed bytes twice
            raw = request(n, "GET", "/api/status")
            assert (await http(n, raw))[0] == 200
            code, _, body = await http(n, raw)
            assert code == 409 and b"replayed" in body

            # expired, from the future, tampered body, another target, unknown key
            for now, why in ((time.time() - 301, "expired"),
                             (time.time() + 301, "from-the-future")):
                hdr = sign_header(n, "GET", "/api/status", b"", now=now)
                code, doc = await call(n, "GET", "/api/status", sign=False,
                                       headers={"dwcp-request": hdr})
                assert code == 401 and f"({why})" in doc["error"], doc
            policy = SetPolicy(100, (), (), True)
            hdr = sign_header(n, "POST", "/api/policy", wire.encode(SetPolicy(0, (), (), False)))
            code, doc = await call(n, "POST", "/api/policy", policy, sign=False,
                                   headers={"dwcp-request": hdr})
            assert code == 401 and "(body-mismatch)" in doc["error"]
            hdr = sign_header(n, "GET", "/api/vms", b"")
            code, doc = await call(n, "GET", "/api/status", sign=False,
                                   headers={"dwcp-request": hdr})
            assert code == 401 and "(wrong-request)" in doc["error"]
            code, doc = await call(n, "GET", "/api/status", sign=False,
                                   headers={"dwcp-request": "AAAA" * 30})
            assert code == 401 and "(malformed)" in doc["error"]

            # roles: a viewer reads, an operator imports and migrates, only an admin
            # changes the policy
            assert (await call(n, "GET", "/api/status", operator="val"))[0] == 200
            code, doc = await call(n, "POST", "/api/imports", ImportVm("w", "dc1", str(memory)),
                                   operator="val")
            assert code == 403 and "has role viewer; this needs operator" in doc["error"]
            code, doc = await call(n, "POST", "/api/policy", policy, operator="otto")
            assert code == 403 and "has role operator; this needs admin" in doc["error"]
            code, doc = await call(n, "DELETE", "/api/vms/w", DeleteVm("w"), operator="val")
            assert code == 403
            assert n.need_core().ledger.policy.kill_switch is False

            # a web page: another origin, a form's content type, a cross-site fetch
            for extra, status in (({"origin": "http://evil.example"}, 403),
                                  ({"sec-fetch-site": "cross-site"}, 403),
                                  ({"content-type": "application/x-www-form-urlencoded"}, 415),
                                  ({"content-type": "text/plain"}, 415),
                                  ({"content-type": "multipart/form-data; boundary=x"}, 415)):
                code, doc = await call(n, "POST", "/api/policy", policy, headers=extra)
                assert code == status, (extra, doc)
            # DNS rebinding: the page's own name in Host, for reads as for writes
            for path in ("/api/status", "/health", "/"):
                code, doc = await call(n, "GET", path,
                                       headers={"host": f"evil.example:{n.api_port}"})
                assert code == 421 and "is not this node's API" in doc["error"]
            code, doc = await call(n, "GET", "/health", headers={"host": f"localhost:{n.api_port}"})
            assert code == 200  # a loopback API answers to localhost too
            assert n.need_core().ledger.policy.kill_switch is False

            # the operator does what the role allows, on the same node, meanwhile
            code, doc = await api_import(n, "web", memory, [disk])
            assert code == 201, doc
            code, doc = await api_migrate(n, "web", "dc2")
            assert code == 202, doc

    trio.run(main)


def test_the_dashboard_opens_from_a_one_time_link_and_only_reads(tmp_path: Path) -> None:
    cfg = _federation(tmp_path)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data", names=("dc1",)) as nodes:
            n = nodes["dc1"]
            link = dashboard_link(n, operator="val")
            target = link.split(host(n), 1)[1]
            code, headers, _ = await http(n, request(n, "GET", target, sign=False))
            assert code == 303 and headers["location"] == "/"
            cookie = headers["set-cookie"]
            for part in ("HttpOnly", "SameSite=Strict", "Path=/"):
                assert part in cookie, cookie
            sid = cookie.split(";", 1)[0]
            # the link works once
            code, _, body = await http(n, request(n, "GET", target, sign=False))
            assert code == 409 and b"used already" in body
            # an old link is refused
            token = sign_header(n, "GET", "/dashboard", b"", "val", now=time.time() - LINK_TTL - 5)
            code, _, body = await http(n, request(n, "GET", f"/dashboard?token={token}",
                                                  sign=False))
            assert code == 401 and b"(expired)" in body
            # the session reads the page and the status
            code, headers, page = await http(n, request(n, "GET", "/", sign=False,
                                                        headers={"cookie": sid}))
            assert code == 200 and page.startswith(b"<!doctype html>")
            assert "script-src 'sha256-" in headers["content-security-policy"]
            assert headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "no-referrer"
            code, doc = await call(n, "GET", "/api/status", sign=False, headers={"cookie": sid})
            assert code == 200 and doc["dc"] == "dc1"
            # ... and nothing else, even same-origin with the right content type
            code, doc = await call(n, "POST", "/api/policy", SetPolicy(1, (), (), False),
                                   sign=False, headers={"cookie": sid,
                                                        "origin": f"http://{host(n)}"})
            assert code == 403 and "only reads" in doc["error"]
            code, doc = await call(n, "GET", "/api/status", sign=False,
                                   headers={"cookie": "dwcp_session=guessed"})
            assert code == 401

    trio.run(main)


# --------------------------------------------------------------------------- the server alone


class _Node:
    """Enough of a node for the server: a log, and nothing a route could use (a route
    that reaches further fails loudly, which the server answers 500)."""

    def __init__(self) -> None:
        self.log = JsonLog("test", io.StringIO())

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the test node has no {name}")


_AUTHORITY = "node.test:7301"


def _server(tmp_path: Path, limits: ApiLimits = DEFAULT_LIMITS) -> ApiServer:
    fed = config.load(make_federation(tmp_path / "fed"))
    return ApiServer(_Node(), Door(fed, frozenset({_AUTHORITY})), limits)  # type: ignore[arg-type]


_HEALTH = f"GET /health HTTP/1.1\r\nhost: {_AUTHORITY}\r\n\r\n".encode()


async def _exchange(server: ApiServer, raw: bytes, source: str = "192.0.2.1",
                    eof: bool = True) -> bytes:
    client, stream = trio.testing.memory_stream_pair()
    out = b""
    async with trio.open_nursery() as nursery:
        server.nursery = nursery
        nursery.start_soon(server.serve_connection, stream, source)
        try:
            await client.send_all(raw)
            if eof:
                await client.send_eof()
            with trio.fail_after(REQUEST_DEADLINE + 5):
                while chunk := await client.receive_some(65536):
                    out += chunk
        except trio.BrokenResourceError:  # the server closed the connection on us
            pass
    return out


def _status(out: bytes) -> int:
    assert out.startswith(b"HTTP/1.1 "), out[:80]
    return int(out.split(b" ", 2)[1])


def test_a_slow_client_is_cut_off_and_others_are_served(tmp_path: Path) -> None:
    server = _server(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            slow, stream = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_connection, stream, "192.0.2.9")
            await slow.send_all(b"GET /health HTTP/1.1\r\nhost: ")  # ... and never more
            t0 = trio.current_time()
            out = await _exchange(server, _HEALTH)
            assert _status(out) == 200 and trio.current_time() - t0 < 1
            got = b""
            while chunk := await slow.receive_some(65536):
                got += chunk
            assert _status(got) == 408
            assert REQUEST_DEADLINE <= trio.current_time() - t0 < REQUEST_DEADLINE + 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_client_that_never_reads_is_cut_off(tmp_path: Path, monkeypatch: Any) -> None:
    server = _server(tmp_path)
    # an answer larger than a memory stream takes without the client reading
    big = api_http.Answer(200, "application/json", b"x" * (1 << 20))

    async def answer(*_: Any) -> Any:
        return big

    monkeypatch.setattr(server, "answer", answer)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            client, stream = trio.testing.memory_stream_pair()
            done = trio.Event()

            async def serve() -> None:
                await server.serve_connection(stream, "192.0.2.7")
                done.set()

            nursery.start_soon(serve)
            await client.send_all(_HEALTH)
            t0 = trio.current_time()
            await done.wait()
            assert trio.current_time() - t0 >= api_http.SEND_DEADLINE
            assert server.cap.open == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_connection_caps_per_source_and_in_all(tmp_path: Path) -> None:
    server = _server(tmp_path, ApiLimits(total=3, per_source=2))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            held = []
            for source in ("192.0.2.1", "192.0.2.1"):
                client, stream = trio.testing.memory_stream_pair()
                nursery.start_soon(server.serve_connection, stream, source)
                held.append(client)
            await trio.testing.wait_all_tasks_blocked()
            # a third from the same source is closed at once, unanswered
            assert await _exchange(server, _HEALTH, "192.0.2.1") == b""
            assert server.cap.refused == {"source": 1}
            assert _status(await _exchange(server, _HEALTH, "192.0.2.2")) == 200
            client, stream = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_connection, stream, "192.0.2.3")
            held.append(client)
            await trio.testing.wait_all_tasks_blocked()
            assert await _exchange(server, _HEALTH, "192.0.2.4") == b""  # 3 in all
            assert server.cap.refused == {"source": 1, "total": 1}
            for c in held:
                await c.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert server.cap.open == 0 and server.cap.by_source == {}
            assert _status(await _exchange(server, _HEALTH, "192.0.2.1")) == 200

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_oversized_requests_are_refused_before_they_are_read(tmp_path: Path) -> None:
    server = _server(tmp_path)
    huge = (f"POST /api/policy HTTP/1.1\r\nhost: {_AUTHORITY}\r\ncontent-type: "
            f"application/cbor\r\ncontent-length: {100 * MAX_BODY}\r\n\r\n").encode()
    out = trio.run(_exchange, server, huge)
    assert _status(out) == 413 and b"the limit is" in out
    long_head = (f"GET /health HTTP/1.1\r\nhost: {_AUTHORITY}\r\nx: {'a' * 20000}\r\n\r\n"
                 .encode())
    assert _status(trio.run(_exchange, server, long_head)) == 431
    twice = (f"GET /api/status HTTP/1.1\r\nhost: {_AUTHORITY}\r\norigin: http://{_AUTHORITY}"
             f"\r\norigin: http://evil.example\r\n\r\n".encode())
    out = trio.run(_exchange, server, twice)
    assert _status(out) == 400 and b"repeated" in out


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "BREW", "G\x00T", ""])
_TARGETS = st.sampled_from(["/health", "/ready", "/api/status", "/api/policy", "/api/vms/x",
                            "/api/migrations/m/cancel", "/dashboard?token=abc", "/nope",
                            "*", "http://x/", "/\xff", "/a b", ""]) | st.text(max_size=40)
_HEADER_LINES = st.lists(st.sampled_from([
    f"host: {_AUTHORITY}", "host: evil.example", "content-type: application/cbor",
    "content-type: text/plain", "origin: http://evil.example", "transfer-encoding: chunked",
    "content-length: 5", "content-length: -1", "content-length: 99999999999",
    "dwcp-request: AAAA", "dwcp-request: ", "cookie: dwcp_session=x", "connection: close",
    "authorization: Bearer x", "x: \x01", ": empty", "no-colon",
]) | st.text(max_size=30), max_size=6)


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    line = f"{draw(_METHODS)} {draw(_TARGETS)} HTTP/1.{draw(st.sampled_from('01x'))}"
    head = "\r\n".join([line, *draw(_HEADER_LINES)]) + "\r\n\r\n"
    raw = head.encode("utf-8", "surrogateescape") + draw(st.binary(max_size=200))
    cut = draw(st.integers(0, len(raw)))
    return raw[:cut] if draw(st.booleans()) else raw  # truncated requests too


@settings(max_examples=150)
@given(_requests())
def test_any_bytes_get_a_4xx_or_a_close_and_the_server_serves_on(raw: bytes) -> None:
    server = _FUZZ_SERVER[0]

    async def main() -> tuple[bytes, bytes]:
        first = await _exchange(server, raw)
        return first, await _exchange(server, _HEALTH)

    out, after = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    if out:  # HTTP with a JSON error, or an answer of an open route; never a traceback
        status = _status(out)
        assert status < 500 or status == 503, out[:300]
        if status >= 400 and not raw.startswith(b"HEAD "):  # HEAD: a head without a body
            assert b'{"error":' in out
    assert _status(after) == 200 and server.cap.open == 0


_FUZZ_SERVER: list[ApiServer] = []


@pytest.fixture(autouse=True, scope="module")
def _fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    _FUZZ_SERVER.append(_server(tmp_path_factory.mktemp("fuzz")))
    yield
    _FUZZ_SERVER.clear()
