"""The node's HTTP API, on the DC's ``api`` endpoint.

=======================  ==================================================================
``GET /``                the dashboard: one self-contained HTML page that polls
                         ``/api/status`` (:mod:`federation.api.dashboard`)
``GET /health``          200 while the process serves (liveness)
``GET /ready``           200 once the control mesh runs and a PBFT quorum (2f+1 with this
                         DC) is connected; else 503 with the reason
``GET /metrics``         Prometheus text exposition (:class:`federation.node.metrics.NodeCollector`)
``GET /api/status``      JSON: members, links (estimates and modes), routes, ledger height
                         and view, VMs and owners, migrations with progress
``GET /api/vms``         JSON: the ``vms`` part of the status
``POST /api/vms``        import: ``{"name", "memory": PATH, "disks": [PATH]}``; paths are on
                         the node's machine
``POST /api/migrations`` ``{"vm", "to"}`` -> 202 ``{"id"}``
``GET /api/migrations/ID``  one migration (404 if neither a session nor the ledger knows it)
``POST /api/migrations/ID/cancel``  an operator's cancel -> 202 with the migration; taken
                         by the source's session (aborts through the ledger); a node that
                         is not the source forwards the request to the source's API
``GET /api/policy``      the rollout policy in this node's ledger replica
``POST /api/policy``     rollout: ``{"v3_percent", "target_dcs", "target_vms",
                         "kill_switch"}`` -> 200, once the ledger recorded it
=======================  ==================================================================

The server is a minimal HTTP/1.1 server on trio with h11 (already a dependency of
trio-websocket): a handful of JSON routes need no framework, and h11 does the
parsing and framing correctly (keep-alive, Content-Length, chunked bodies).
Hypercorn's trio worker would add an ASGI stack and a dozen packages for nothing
this API uses. Errors are JSON ``{"error": "..."}`` with a 4xx/5xx status.

The API is a front end over a :class:`federation.node.assembly.Node`: :func:`serve_node`
runs the two together (what ``dwcp node`` runs); the node knows nothing of it.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from federation.api.dashboard import PAGE
from federation.node.errors import LedgerTimeout, NodeError, NotTheSource, UnknownMigration
from federation.node.metrics import NodeCollector
from federation.node.status import migration_status, policy_doc, status

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["serve_node", "serve_api", "open_api", "handle_request", "ApiError", "MAX_BODY"]

#: Largest request body: an import names files, it does not carry them; 64 KiB is
#: a thousand times what a request needs.
MAX_BODY = 64 * 1024
#: A client must send its request within this (slowloris bound, as nginx's
#: client_header_timeout default of 60 s, shortened for a local operator API).
REQUEST_TIMEOUT = 10.0
#: An operation (an import copies the images and waits for the ledger) may take this
#: long; the ledger client gives up after 30 s (consensus.pbft.replica.PbftConfig).
OPERATION_TIMEOUT = 600.0
#: A cancel forwarded to the source's API must be answered within this: the source takes
#: it in one turn of its core without waiting for the ledger, so REQUEST_TIMEOUT's bound
#: for a whole request is ample.
FORWARD_TIMEOUT = REQUEST_TIMEOUT
_READ = 64 * 1024
_CANCEL = "/cancel"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "the body must be a JSON object")
    return doc


def _field(doc: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = doc.get(name, default)
    if value is None:
        raise ApiError(400, f"{name}: required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ApiError(400, f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _ready(node: Node) -> tuple[bool, str]:
    if not node.started.is_set():
        return False, "starting"
    if node.core is None:
        return False, node.no_ledger
    replica = node.core.replica.status_record()
    connected = len(node.runtime.links) + 1
    if connected < replica.quorum:
        return False, (f"{connected} of {len(replica.members)} DCs connected, a quorum is "
                       f"{replica.quorum}")
    return True, "ready"


async def handle_request(node: Node, method: str, path: str,
                         body: bytes) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request."""
    js = "application/json"
    if method == "GET" and path == "/":
        return 200, "text/html; charset=utf-8", PAGE
    if method == "GET" and path == "/health":
        return 200, js, b'{"status":"ok"}'
    if method == "GET" and path == "/ready":
        ok, why = _ready(node)
        return (200 if ok else 503), js, json.dumps({"ready": ok, "reason": why}).encode()
    if method == "GET" and path == "/metrics":
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(node))
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
    if method == "GET" and path == "/api/status":
        return 200, js, json.dumps(status(node)).encode()
    if method == "GET" and path == "/api/vms":
        return 200, js, json.dumps(status(node)["vms"]).encode()
    try:
        if method == "POST" and path == "/api/vms":
            doc = _json_body(body)
            disks = _field(doc, "disks", list, [])
            if not all(isinstance(d, str) for d in disks):
                raise ApiError(400, "disks: expected a list of paths")
            info = await node.import_vm(_field(doc, "name", str),
                                        Path(_field(doc, "memory", str)),
                                        [Path(d) for d in disks])
            return 201, js, json.dumps({"name": info.name, "epoch": info.epoch,
                                        "state": info.state.value,
                                        "layout": info.layout}).encode()
        if method == "POST" and path == "/api/migrations":
            doc = _json_body(body)
            mid = await node.migrate(_field(doc, "vm", str), _field(doc, "to", str))
            return 202, js, json.dumps({"id": mid}).encode()
        if method == "POST" and path == "/api/policy":
            doc = _json_body(body)
            lists = {k: _field(doc, k, list, []) for k in ("target_dcs", "target_vms")}
            if not all(isinstance(x, str) for v in lists.values() for x in v):
                raise ApiError(400, "target_dcs, target_vms: expected lists of names")
            policy = await node.set_policy(_field(doc, "v3_percent", int), **lists,
                                           kill_switch=_field(doc, "kill_switch", bool, False))
            return 200, js, json.dumps(policy_doc(policy)).encode()
        if method == "GET" and path == "/api/policy":
            return 200, js, json.dumps(policy_doc(node.need_core().ledger.policy)).encode()
        if method == "POST" and path.startswith("/api/migrations/") and path.endswith(_CANCEL):
            mid = urllib.parse.unquote(path[len("/api/migrations/"):-len(_CANCEL)])
            return await _cancel(node, mid, _json_body(body))
        if method == "GET" and path.startswith("/api/migrations/"):
            mid = urllib.parse.unquote(path[len("/api/migrations/"):])
            found = migration_status(node, mid)
            if found is None:
                raise ApiError(404, f"no migration {mid!r}")
            return 200, js, json.dumps(found).encode()
    except LedgerTimeout as exc:
        return 504, js, json.dumps({"error": str(exc)}).encode()
    except UnknownMigration as exc:
        return 404, js, json.dumps({"error": str(exc)}).encode()
    except NodeError as exc:
        return 409, js, json.dumps({"error": str(exc)}).encode()
    except ApiError as exc:
        return exc.status, js, json.dumps({"error": str(exc)}).encode()
    known = ("/", "/health", "/ready", "/metrics", "/api/status", "/api/vms", "/api/migrations",
             "/api/policy")
    if path in known or path.startswith("/api/migrations/"):
        return 405, js, json.dumps({"error": f"{method} is not allowed on {path}"}).encode()
    return 404, js, json.dumps({"error": f"no route {path}"}).encode()


async def _cancel(node: Node, mid: str, doc: dict[str, Any]) -> tuple[int, str, bytes]:
    """Cancel at the source, or forward to it once (``forwarded_by`` marks a forwarded
    request, so two nodes that disagree about the source never bounce it forever)."""
    forwarded_by = doc.get("forwarded_by")
    if forwarded_by is not None and not isinstance(forwarded_by, str):
        raise ApiError(400, "forwarded_by: expected str")
    try:
        await node.cancel_migration(mid)
    except NotTheSource as exc:
        if forwarded_by is not None:
            raise ApiError(409, f"{exc} (forwarded here by {forwarded_by})") from None
        dc = node.fed.dc(exc.source)
        path = f"/api/migrations/{urllib.parse.quote(mid, safe='')}{_CANCEL}"
        body = json.dumps({"forwarded_by": node.name}).encode()
        try:
            with trio.fail_after(FORWARD_TIMEOUT):
                code, payload = await _post(dc.api.host, dc.api.port, path, body)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError) as err:
            why = "no answer in time" if isinstance(err, trio.TooSlowError) else str(err)
            raise ApiError(502, f"cannot reach {exc.source}, the source of migration "
                                f"{mid!r}, at {dc.api.host}:{dc.api.port}: {why}") from None
        return code, "application/json", payload
    return 202, "application/json", json.dumps(migration_status(node, mid)).encode()


async def _post(host: str, port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """One JSON POST to another node's API: (status, body)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", f"{host}:{port}"), ("content-type", "application/json"),
                   ("content-length", str(len(body))), ("connection", "close")]
        request: list[Any] = [h11.Request(method="POST", target=path, headers=headers),
                              h11.Data(data=body), h11.EndOfMessage()]
        for out in request:
            await _send(stream, conn, out)
        code, payload = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(_READ))
            elif isinstance(event, h11.Response):
                code = event.status_code
            elif isinstance(event, h11.Data):
                payload += event.data
                if len(payload) > MAX_BODY:
                    raise h11.RemoteProtocolError(f"an answer over {MAX_BODY} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                if not code:
                    raise h11.RemoteProtocolError("the connection closed without an answer")
                return code, bytes(payload)


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _serve_connection(node: Node, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    async with stream:
        while True:
            request: h11.Request | None = None
            body = bytearray()
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            data = await stream.receive_some(_READ)
                            conn.receive_data(data)
                            if not data and conn.their_state is not h11.DONE:
                                return
                            continue
                        if isinstance(event, h11.Request):
                            request = event
                        elif isinstance(event, h11.Data):
                            body += event.data
                            if len(body) > MAX_BODY:
                                raise ApiError(413, f"the body exceeds {MAX_BODY} bytes")
                        elif isinstance(event, h11.EndOfMessage):
                            break
                        elif isinstance(event, h11.ConnectionClosed):
                            return
            except (h11.RemoteProtocolError, ApiError) as exc:
                code = exc.status if isinstance(exc, ApiError) else 400
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(stream, conn, code, "application/json",
                                   json.dumps({"error": str(exc)}).encode(), close=True)
                return
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            assert request is not None
            path = request.target.decode("ascii", "replace").split("?", 1)[0]
            method = request.method.decode("ascii", "replace")
            try:
                with trio.move_on_after(OPERATION_TIMEOUT) as scope:
                    code, ctype, payload = await handle_request(node, method, path, bytes(body))
            except Exception as exc:  # a bug behind one route must not take the node down
                node.log.event("api_error", method=method, path=path, error=repr(exc))
                code, ctype = 500, "application/json"
                payload = json.dumps({"error": f"internal error: {exc!r}"}).encode()
            if scope.cancelled_caught:
                code, ctype = 504, "application/json"
                payload = b'{"error":"the operation did not finish in time"}'
            try:
                await _respond(stream, conn, code, ctype, payload, close=False)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


async def _respond(stream: trio.SocketStream, conn: h11.Connection, code: int, ctype: str,
                   payload: bytes, *, close: bool) -> None:
    headers = [("content-type", ctype), ("content-length", str(len(payload)))]
    if close:
        headers.append(("connection", "close"))
    await _send(stream, conn, h11.Response(status_code=code, headers=headers))
    await _send(stream, conn, h11.Data(data=payload))
    await _send(stream, conn, h11.EndOfMessage())


async def open_api(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the API endpoint; raises :class:`federation.node.errors.NodeError` naming it."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise NodeError(f"cannot listen on API endpoint {host}:{port}: "
                        f"{exc.strerror or exc}") from None


async def serve_api(node: Node, listeners: list[trio.SocketListener],
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API until cancelled; reports the bound port through ``task_status``."""
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(node, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        node.log.event("api_listening", host=node.api_host, port=bound)
        task_status.started(bound)


async def serve_node(node: Node, listeners: list[trio.SocketListener] | None = None, *,
                     task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``node`` with its API (on ``listeners``, else bound here) until the node shuts
    down. The node's endpoints and the API's are bound first, so a busy port is a plain
    exception (:class:`mesh.runtime.node_runtime.ListenError`, :class:`NodeError`); the API
    listens before the node reports itself ready."""
    await node.bind()
    if listeners is None:
        listeners = await open_api(node.api_host, node.api_port)
    async with trio.open_nursery() as nursery:
        node.api_port = await nursery.start(serve_api, node, listeners)

        async def run_node(task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
                           ) -> None:
            await node.run(task_status=task_status)
            nursery.cancel_scope.cancel()  # the node shut down: the API ends too

        await nursery.start(run_node)
        task_status.started(node)
