"""The node's HTTP API server, on the DC's ``api`` endpoint: connections, the door, routes.

A minimal HTTP/1.1 server on trio with h11 (already a dependency of trio-websocket):
h11 parses and frames (keep-alive, Content-Length, chunked bodies); a handful of routes
need no framework. Per connection, in order:

- :class:`~federation.api.limits.ConnectionCap`: at most 64 connections, 16 per source
  address; one over is closed at once;
- the request (head and body) must arrive within ``REQUEST_DEADLINE`` (slowloris: 408),
  with a head of at most ``MAX_HEAD`` (431) and a body of at most ``MAX_BODY`` (413, refused
  on its Content-Length before a byte of it is read); whatever h11 cannot parse, a
  repeated security header, a target that is not ASCII: 400 — never 500;
- :class:`~federation.api.door.Door`: Host, Origin and content type, then the
  operator's signature, a dashboard session or the metrics token (401/403/415/421);
- the route (:mod:`federation.api.routes`), within ``OPERATION_TIMEOUT``; a bug behind a
  route answers 500 and the node serves on;
- the answer must be taken within ``SEND_DEADLINE``.

Every answer says ``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff``;
the dashboard page also its Content-Security-Policy, ``X-Frame-Options: DENY`` and
``Referrer-Policy: no-referrer``. No answer carries CORS headers, so a page of another
origin cannot read any. Every request that is refused or changes state is logged
(``api_refused``, at most one line a second, with the count; ``api_request``).

The API is a front end over a :class:`federation.node.assembly.Node`: :func:`serve_node`
runs the two together (what ``dwcp node`` runs); the node knows nothing of it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import trio

from federation.api.dashboard import CSP
from federation.api.door import Caller, DashboardLink, Door, Refused, api_authorities
from federation.api.limits import (
    DEFAULT_LIMITS,
    MAX_BODY,
    MAX_HEAD,
    REQUEST_DEADLINE,
    SEND_DEADLINE,
    ApiLimits,
    ConnectionCap,
)
from federation.api.routes import JSON, Answer, ApiError, handle_request, pending_answer
from federation.api.sessions import cookie_header
from federation.node.errors import NodeError

if TYPE_CHECKING:
    from federation.node.assembly import Node

__all__ = ["serve_node", "serve_api", "open_api", "ApiServer", "ApiError", "MAX_BODY",
           "OPERATION_TIMEOUT"]

#: An operation waits for the ledger; the ledger client gives up after 30 s
#: (consensus.pbft.replica.PbftConfig), a register or a policy change well within this.
OPERATION_TIMEOUT = 120.0
_READ = 64 * 1024
#: Headers the door decides on: a request that repeats one is ambiguous (which Host, which
#: signature?) and is refused, as RFC 9110 section 5.3 allows for fields that are not lists.
_SINGLE = frozenset({"host", "origin", "content-type", "cookie", "authorization",
                     "sec-fetch-site", "dwcp-request"})
_BASE_HEADERS = (("cache-control", "no-store"), ("x-content-type-options", "nosniff"))
_PAGE_HEADERS = (("content-security-policy", CSP), ("x-frame-options", "DENY"),
                 ("referrer-policy", "no-referrer"))
#: At most one ``api_refused`` log line per this many seconds (the rest are counted).
REFUSAL_LOG_EVERY = 1.0


class _TooLarge(Exception):
    pass


class ApiServer:
    """One node's API: its door, its connection cap, and the nursery an import's copy
    runs in."""

    def __init__(self, node: Node, door: Door, limits: ApiLimits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.door = door
        self.cap = ConnectionCap(limits)
        self.clock = clock
        self.nursery: trio.Nursery | None = None
        self._refusals_unlogged = 0
        self._last_refusal_log = -REFUSAL_LOG_EVERY

    # ------------------------------------------------------------------ one request

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes,
                     source: str) -> Answer:
        now = self.clock()
        try:
            who = self.door.check(method, target, headers, body, now)
        except Refused as exc:
            self._refused(source, method, target, exc.status, str(exc))
            return Answer(exc.status, JSON, json.dumps({"error": str(exc)}).encode())
        if isinstance(who, DashboardLink):
            sid = self.door.sessions.open(who.operator, now)
            self.node.log.event("dashboard_session", operator=who.operator, source=source)
            return Answer(303, JSON, b'{"location":"/"}',
                          (("location", "/"), ("set-cookie", cookie_header(sid))))
        path = target.split("?", 1)[0]
        assert self.nursery is not None, "serve_api sets the nursery before serving"
        try:
            with trio.move_on_after(OPERATION_TIMEOUT) as scope:
                answer = await handle_request(self.node, who, method, path, self.nursery)
        except Exception as exc:  # a bug behind one route must not take the node down
            self.node.log.event("api_error", method=method, path=path, error=repr(exc))
            answer = Answer(500, JSON, json.dumps({"error": f"internal error: {exc!r}"})
                            .encode())
        if scope.cancelled_caught:
            if who.request is not None and method in ("POST", "DELETE"):
                answer = pending_answer(self.node, who, path,
                                        f"the operation did not finish within "
                                        f"{OPERATION_TIMEOUT:.0f} s")
            else:
                answer = Answer(504, JSON, b'{"error":"the operation did not finish in time"}')
        if method not in ("GET", "HEAD"):
            self._changed(who, method, path, answer.status)
        return answer

    def _changed(self, who: Caller, method: str, path: str, status: int) -> None:
        nonce = who.request.nonce if who.request is not None else None
        self.node.log.event("api_request", operator=who.operator, method=method, path=path,
                            status=status, request_id=nonce)

    def _refused(self, source: str, method: str, target: str, status: int, why: str) -> None:
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            self.node.log.event("api_refused", source=source, method=method,
                                path=target.split("?", 1)[0][:200], status=status,
                                reason=why[:300], refused_since_last=self._refusals_unlogged)
            self._refusals_unlogged = 0
            self._last_refusal_log = now

    # ------------------------------------------------------------------ one connection

    async def serve_connection(self, stream: trio.abc.HalfCloseableStream,
                               source: str) -> None:
        why = self.cap.admit(source)
        if why is not None:
            self._refused(source, "-", "-", 503, f"connection cap ({why})")
            await stream.aclose()
            return
        try:
            async with stream:
                await self._requests(stream, source)
        finally:
            self.cap.release(source)

    async def _requests(self, stream: trio.abc.HalfCloseableStream, source: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                with trio.fail_after(REQUEST_DEADLINE):
                    got = await _read_request(stream, conn)
            except trio.TooSlowError:
                await self._fail(stream, conn, 408, "the request did not arrive within "
                                 f"{REQUEST_DEADLINE:.0f} s", source)
                return
            except h11.RemoteProtocolError as exc:
                await self._fail(stream, conn, 400, f"malformed request: {exc}", source)
                return
            except _TooLarge as exc:
                await self._fail(stream, conn, 413, str(exc), source)
                return
            except ApiError as exc:
                await self._fail(stream, conn, exc.status, str(exc), source)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if got is None:
                return
            method, target, headers, body = got
            answer = await self.answer(method, target, headers, body, source)
            if not await _send_answer(stream, conn, answer, close=False):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _fail(self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection,
                    status: int, message: str, source: str) -> None:
        self._refused(source, "-", "-", status, message)
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await _send_answer(stream, conn, Answer(status, JSON, json.dumps(
                {"error": message}).encode()), close=True)


async def _read_request(stream: trio.abc.HalfCloseableStream, conn: h11.Connection,
                        ) -> tuple[str, str, dict[str, str], bytes] | None:
    """The next request on ``conn``: (method, target, headers, body); None if the client
    closed the connection between requests."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(_READ))
            conn.receive_data(data)
            if not data and conn.their_state is h11.IDLE:
                return None
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            request = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and int(length) > MAX_BODY:
                raise _TooLarge(f"the body is {int(length)} bytes; the limit is {MAX_BODY}")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge(f"the body exceeds {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return _parts(request) + (bytes(body),)


def _parts(request: h11.Request) -> tuple[str, str, dict[str, str]]:
    try:
        method = request.method.decode("ascii")
        target = request.target.decode("ascii")
    except UnicodeDecodeError:
        raise ApiError(400, "the request line is not ASCII") from None
    size = len(request.target) + sum(len(n) + len(v) for n, v in request.headers)
    if size > MAX_HEAD:  # h11 bounds only a head that arrives in pieces
        raise ApiError(431, f"the request head is {size} bytes; the limit is {MAX_HEAD}")
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers:
        name = raw_name.decode("ascii", "replace")
        if name in headers and name in _SINGLE:
            raise ApiError(400, f"header {name!r} is repeated")
        headers[name] = raw_value.decode("latin-1")
    return method, target, headers


async def _send_answer(stream: trio.abc.HalfCloseableStream, conn: h11.Connection,
                       answer: Answer, *, close: bool) -> bool:
    """Send ``answer`` within SEND_DEADLINE; False if the client is gone or too slow."""
    headers = [("content-type", answer.content_type),
               ("content-length", str(len(answer.body))), *_BASE_HEADERS, *answer.headers]
    if answer.content_type.startswith("text/html"):
        headers += _PAGE_HEADERS
    if close:
        headers.append(("connection", "close"))
    events: list[Any] = [h11.Response(status_code=answer.status, headers=headers),
                         h11.Data(data=answer.body), h11.EndOfMessage()]
    try:
        with trio.fail_after(SEND_DEADLINE):
            for event in events:
                data = conn.send(event)
                if data:
                    await stream.send_all(data)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
            h11.LocalProtocolError):
        return False
    return True


# --------------------------------------------------------------------------- serving


async def open_api(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the API endpoint; raises :class:`federation.node.errors.NodeError` naming it."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise NodeError(f"cannot listen on API endpoint {host}:{port}: "
                        f"{exc.strerror or exc}") from None


def _source(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


async def serve_api(node: Node, listeners: list[trio.SocketListener], *,
                    metrics_token: str = "", limits: ApiLimits = DEFAULT_LIMITS,
                    task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
    """Serve the API until cancelled; reports the :class:`ApiServer` (its port is
    ``node.api_port`` once bound) through ``task_status``."""
    bound = listeners[0].socket.getsockname()[1]
    door = Door(node.fed, api_authorities(node.api_host, bound), metrics_token=metrics_token)
    server = ApiServer(node, door, limits)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await server.serve_connection(stream, _source(stream))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async with trio.open_nursery() as nursery:
        server.nursery = nursery
        await nursery.start(trio.serve_listeners, handler, listeners)
        node.api_port = bound
        node.log.event("api_listening", host=node.api_host, port=bound)
        task_status.started(server)


async def serve_node(node: Node, listeners: list[trio.SocketListener] | None = None, *,
                     metrics_token: str = "",
                     task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``node`` with its API (on ``listeners``, else bound here) until the node shuts
    down. The node's endpoints and the API's are bound first, so a busy port is a plain
    exception (:class:`mesh.runtime.node_runtime.ListenError`, :class:`NodeError`); the API
    listens before the node reports itself ready."""
    await node.bind()
    if listeners is None:
        listeners = await open_api(node.api_host, node.api_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_api, node, listeners, metrics_token=metrics_token))

        async def run_node(task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
                           ) -> None:
            await node.run(task_status=task_status)
            nursery.cancel_scope.cancel()  # the node shut down: the API ends too

        await nursery.start(run_node)
        task_status.started(node)
