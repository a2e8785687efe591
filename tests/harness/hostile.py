"""Helpers of the hostile tests: a small federation of runtimes on loopback, a raw
attacker's connections, and waits on conditions."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from mesh import identity
from mesh.channel import SecureChannel
from mesh.runtime.log import JsonLog
from mesh.runtime.node_runtime import Peer, Runtime
from tests.harness.runtime import free_ports

#: Source addresses of an attacker on loopback (Linux routes all of 127.0.0.0/8 to lo),
#: apart from 127.0.0.1 where the federation's own DCs dial from.
ATTACKER_HOSTS = tuple(f"127.0.0.{i}" for i in range(2, 10))


class Federation:
    """Identities, ports and logs of ``count`` DCs named dc1, dc2, ..."""

    def __init__(self, count: int, tmp: Path | None = None, federation: str = "hostile") -> None:
        self.names = [f"dc{i}" for i in range(1, count + 1)]
        self.ids = {n: identity.Identity.from_seed(bytes([i]) * 32)
                    for i, n in enumerate(self.names, start=1)}
        self.ports = dict(zip(self.names, free_ports(count), strict=True))
        self.federation = federation
        self.tmp = tmp
        self.logs: dict[str, io.StringIO] = {}

    def keys(self) -> dict[str, identity.PublicKey]:
        return {n: i.public for n, i in self.ids.items()}

    def runtime(self, name: str, seed: int = 0) -> Runtime:
        peers = [Peer(n, self.ids[n].public, "127.0.0.1", self.ports[n])
                 for n in self.names if n != name]
        self.logs[name] = io.StringIO()
        return Runtime(name=name, federation=self.federation, identity=self.ids[name],
                       public_key=self.ids[name].public, peers=peers,
                       listen_host="127.0.0.1", listen_port=self.ports[name], versions=(1, 3),
                       log=JsonLog(name, self.logs[name]), rng=random.Random(seed))

    def channel(self, name: str, *, peer: str | None = None,
                ident: identity.Identity | None = None) -> SecureChannel:
        """``name``'s end of a channel: an initiator when ``peer`` is named."""
        return SecureChannel(identity=ident or self.ids[name], name=name,
                             federation=self.federation, peers=self.keys(), versions=(1, 3),
                             initiator=peer is not None, peer=peer)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs[name].getvalue().splitlines()]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, checking every 10 ms; TooSlowError after
    ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def connect_from(host: str, port: int, source: str) -> trio.SocketStream:
    """A TCP connection to ``host:port`` bound to the local address ``source``."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def closed_by_peer(stream: trio.SocketStream, timeout: float = 10.0) -> bool:
    """True when the far end closes ``stream`` (EOF or reset) within ``timeout``."""
    with trio.move_on_after(timeout):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True
    return False


def fd_limited_node(port: int, peer_port: int, spare_fds: int) -> None:
    """Run dc1 of a two-DC :class:`Federation` on ``port`` in this process, with
    RLIMIT_NOFILE lowered to the descriptors open now plus ``spare_fds``; its JSON log
    goes to stdout. For a subprocess (``python -c``) of the descriptor-exhaustion test."""
    import os
    import resource
    import sys

    from mesh.runtime import node_runtime

    node_runtime.HANDSHAKE_TIMEOUT = 1.0  # free the flood's descriptors soon
    fed = Federation(2)
    fed.ports = {"dc1": port, "dc2": peer_port}
    peers = [Peer("dc2", fed.ids["dc2"].public, "127.0.0.1", peer_port)]
    rt = Runtime(name="dc1", federation=fed.federation, identity=fed.ids["dc1"],
                 public_key=fed.ids["dc1"].public, peers=peers, listen_host="127.0.0.1",
                 listen_port=port, versions=(1, 3), log=JsonLog("dc1", sys.stdout),
                 rng=random.Random(1))

    async def main() -> None:
        await rt.listen()
        open_now = len(os.listdir("/proc/self/fd"))
        limit = open_now + spare_fds
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        rt.log.event("fd_limit", limit=limit)
        await rt.run()

    trio.run(main)
