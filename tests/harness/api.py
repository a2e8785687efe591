"""A node's HTTP API over a real socket, the way any HTTP client reaches it."""

from __future__ import annotations

import json
from typing import Any

import trio

from federation.node.assembly import Node


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


async def call(node: Node, method: str, path: str, doc: Any = None,
               raw: bytes | None = None) -> tuple[int, Any]:
    body = raw if raw is not None else (b"" if doc is None else json.dumps(doc).encode())
    req = (f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
           "connection: close\r\n\r\n").encode() + body
    status, headers, payload = await http(node, req)
    return status, (payload.decode() if path == "/metrics" else json.loads(payload))
