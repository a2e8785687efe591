"""Node runtimes of one mesh on loopback, each with its own SQLite store and a log the
test reads back."""

from __future__ import annotations

import io
import json
import random
import socket
from pathlib import Path
from typing import Any

from mesh import identity
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Peer, Runtime
from mesh.runtime.sqlite_store import SQLiteStore


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Mesh:
    """``count`` DCs dc1..dcN with fresh identities and free loopback ports; ``runtime``
    builds one DC's runtime (the test runs it)."""

    def __init__(self, count: int, tmp: Path, federation: str = "t") -> None:
        self.names = [f"dc{i}" for i in range(1, count + 1)]
        self.ids = {n: identity.generate() for n in self.names}
        self.ports = dict(zip(self.names, free_ports(count), strict=True))
        self.federation = federation
        self.tmp = tmp
        self.logs: dict[str, io.StringIO] = {}

    def runtime(self, name: str, *, federation: str | None = None, seed: int = 0,
                framed: bool = True) -> Runtime:
        """``framed``: offer our own framing on the control links (CONTROL_FRAMES); a
        runtime without it is a peer of an older build (the websocket throughout)."""
        peers = [
            Peer(n, self.ids[n].public, "127.0.0.1", self.ports[n]) for n in self.names if n != name
        ]
        self.logs[name] = io.StringIO()
        return Runtime(
            name=name,
            federation=federation or self.federation,
            identity=self.ids[name],
            public_key=self.ids[name].public,
            peers=peers,
            listen_host="127.0.0.1",
            listen_port=self.ports[name],
            versions=(1, 3),
            store=SQLiteStore(self.tmp / f"{name}.sqlite3"),
            log=JsonLog(name, self.logs[name]),
            rng=random.Random(seed),
            framed=framed,
        )

    def keys(self) -> dict[str, identity.PublicKey]:
        return {n: i.public for n, i in self.ids.items()}

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs[name].getvalue().splitlines()]
