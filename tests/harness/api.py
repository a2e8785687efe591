"""A node's HTTP API over a real socket, the way any HTTP client reaches it: requests
signed by the admin ``federation init`` made (or not signed, or raw bytes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import trio

from consensus.ledger import ImportVm, MigrateVm
from federation.api.auth import HEADER, encode_header, load_operator_key, sign_request
from federation.node.assembly import Node
from mesh import wire


async def http(node: Node, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw request; returns (status, headers, body) of the first response."""
    stream = await trio.open_tcp_stream(node.api_host, node.api_port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"connection closed after {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = await stream.receive_some(65536)
            assert chunk
            body += chunk
        return status, headers, body


def host(node: Node) -> str:
    """The Host header that names ``node``'s API."""
    return f"{node.api_host}:{node.api_port}"


def request(node: Node, method: str, target: str, intent: object = None, *,
            raw: bytes | None = None, sign: bool = True, operator: str = "admin",
            headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one request to ``node``: ``intent`` (or ``raw``) as the body, signed
    by ``operator`` unless ``sign`` is false; ``headers`` replace or add fields."""
    body = raw if raw is not None else b"" if intent is None else wire.encode(intent)
    fields = {"host": host(node), "content-length": str(len(body)), "connection": "close"}
    if body:
        fields["content-type"] = "application/cbor"
    if sign:
        fields[HEADER] = sign_header(node, method, target, body, operator)
    fields |= headers or {}
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode() + body


def sign_header(node: Node, method: str, target: str, body: bytes, operator: str = "admin",
                now: float | None = None) -> str:
    """The ``DWCP-Request`` header of ``operator`` (its key beside ``node``'s federation
    file) for this request, made at ``now`` (default: the wall clock)."""
    key = load_operator_key(Path(node.fed.source).parent / "keys" / f"{operator}.key",
                            node.fed)
    return encode_header(sign_request(key, node.fed, method, target, body,
                                      time.time() if now is None else now))


async def call(node: Node, method: str, path: str, intent: object = None, *,
               raw: bytes | None = None, sign: bool = True, operator: str = "admin",
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, payload = await http(node, request(node, method, path, intent, raw=raw,
                                                  sign=sign, operator=operator,
                                                  headers=headers))
    return status, (payload.decode() if path == "/metrics" and status == 200
                    else json.loads(payload))


async def api_import(node: Node, vm: str, memory: Path | str,
                     disks: list[Path] | list[str] | tuple[str, ...] = ()) -> tuple[int, Any]:
    """``dwcp vm import`` over the API: stage, wait for the copy, register (the answer of
    the first step that fails, else the register's)."""
    intent = ImportVm(vm, node.name, str(memory), tuple(str(d) for d in disks))
    code, doc = await call(node, "POST", "/api/imports", intent)
    if code != 202:
        return code, doc
    while doc["state"] == "copying":
        await node.imports.changed(vm)
        code, doc = await call(node, "GET", f"/api/imports/{vm}")
    if doc["state"] != "staged":
        return 409, doc
    return await call(node, "POST", "/api/vms", intent)


async def api_migrate(node: Node, vm: str, target: str) -> tuple[int, Any]:
    """``dwcp migrate`` over the API: the request names the owner and epoch in ``node``'s
    ledger."""
    led = node.need_core().ledger
    epoch = led.epoch(vm)
    intent = MigrateVm(vm, target, led.owner(vm) or node.name, 0 if epoch is None else epoch)
    return await call(node, "POST", "/api/migrations", intent)


def dashboard_link(node: Node, operator: str = "admin") -> str:
    """What ``dwcp dashboard`` prints for ``node``: a one-time link to its dashboard."""
    token = sign_header(node, "GET", "/dashboard", b"", operator)
    return f"http://{host(node)}/dashboard?token={token}"
