"""Bulk data through a third DC (federation.dataplane.relay): the relay splices AMST streams it can
neither read nor alter undetected, refuses what it should, and a node's v3 migration
follows a bulk route through it, falling back to the direct path when it refuses."""

from __future__ import annotations

import contextlib
import functools
import io
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from federation.dataplane.relay import DataRelay, RelayOpen, RelayRefused, open_relayed
from federation.node.metrics import NodeCollector
from federation.node.status import status
from mesh import identity
from mesh.channel import SecureChannel
from mesh.links.routes import BULK, Route
from mesh.runtime.amst_stream import NET_ERRORS
from mesh.runtime.amst_transfer import AmstServer, TransferCut, send_transfer
from mesh.runtime.log import JsonLog
from tests.harness.data import MiB, chunked, real_bytes
from tests.harness.node import (
    ext4_image,
    image_hashes,
    make_federation,
    memory_image,
    migrate_checked,
    redirect,
    running_nodes,
    wait_outcome,
    wait_vm,
)

TRANSFER = b"relay-test-00001"
KEYS = {n: identity.Identity.from_seed(bytes([i + 31]) * 32) for i, n in enumerate("sxt")}
PEERS = {n: k.public for n, k in KEYS.items()}


def channel(me: str, peer: str | None) -> SecureChannel:
    return SecureChannel(identity=KEYS[me], name=me, federation="relay", peers=PEERS,
                         versions=(1, 3), initiator=peer is not None, peer=peer,
                         random_bytes=random.Random(f"{me}{peer}").randbytes)


class Tap(DataRelay):
    """A relay that keeps what it copies and can flip a byte of it (a hostile DC)."""

    def __init__(self, address: Callable[[str], tuple[str, int] | None], **kw: int) -> None:
        super().__init__("x", address, JsonLog("x", io.StringIO()), **kw)
        self.seen = bytearray()
        self.flip_at: int | None = None

    async def _splice(self, a: trio.abc.Stream, b: trio.abc.Stream) -> str:
        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
            while data := await src.receive_some(1 << 16):
                if self.flip_at is not None and len(self.seen) <= self.flip_at < len(
                        self.seen) + len(data):
                    i = self.flip_at - len(self.seen)
                    data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
                self.seen += data
                self.relayed_bytes += len(data)
                await dst.send_all(data)
            with contextlib.suppress(*NET_ERRORS):
                await dst.send_eof()  # type: ignore[attr-defined]

        broken: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a, b)
                nursery.start_soon(pump, b, a)
        except* NET_ERRORS as group:  # a side reset: the streams' ends see it and resume
            broken.append(str(group.exceptions[0]))
        return broken[0] if broken else ""


async def _listen(nursery: trio.Nursery,
                  handler: Callable[[trio.SocketStream], Awaitable[object]]) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


class Three:
    """Source s, relay x, target t on loopback."""

    def __init__(self, **relay_kw: int) -> None:
        self.got: dict[int, bytes] = {}
        self.target = AmstServer(lambda: channel("t", None))
        self.target.expect(TRANSFER, self.sink)
        self.ports: dict[str, int] = {}
        self.relay = Tap(lambda dc: ("127.0.0.1", self.ports[dc]) if dc in self.ports
                         else None, **relay_kw)
        self.x = AmstServer(lambda: channel("x", None), {RelayOpen: self.relay.serve})

    async def sink(self, chunk: int, payload: bytes) -> None:
        assert chunk not in self.got, f"chunk {chunk} delivered twice"
        self.got[chunk] = payload

    async def start(self, nursery: trio.Nursery) -> None:
        self.ports["t"] = await _listen(nursery, self.target.handle_stream)
        self.ports["x"] = await _listen(nursery, self.x.handle_stream)
        self.ports["s"] = 1  # a member, never dialled

    async def via_x(self, target: str = "t") -> trio.abc.Stream:
        return await open_relayed("x", ("127.0.0.1", self.ports["x"]), channel("s", "x"),
                                  target)


async def test_relay_carries_a_transfer_it_cannot_read() -> None:
    data = real_bytes(8 * MiB)
    three = Three()
    async with trio.open_nursery() as nursery:
        await three.start(nursery)
        report = await send_transfer(TRANSFER, chunked(data), connect=three.via_x,
                                     new_channel=lambda: channel("s", "t"))
        nursery.cancel_scope.cancel()
    assert b"".join(three.got[i] for i in range(len(three.got))) == data
    assert report.chunks == 8 and three.relay.accepted == report.streams_opened
    assert three.relay.relayed_bytes > len(data)
    seen = bytes(three.relay.seen)
    # the relay saw ciphertext only: no 64-byte piece of the payload appears in it
    for offset in range(0, len(data), len(data) // 16):
        assert data[offset:offset + 64] not in seen
    assert three.relay.active == 0


async def test_a_byte_changed_by_the_relay_is_refused_never_delivered() -> None:
    data = real_bytes(4 * MiB)
    three = Three()
    three.relay.flip_at = 2 * MiB  # inside a chunk frame of the first stream
    async with trio.open_nursery() as nursery:
        await three.start(nursery)
        core_kw = {"connect": three.via_x, "new_channel": lambda: channel("s", "t")}
        try:
            await send_transfer(TRANSFER, chunked(data), **core_kw)  # type: ignore[arg-type]
        except TransferCut:
            pass  # every stream through the tampering relay may die: still nothing bad lands
        three.relay.flip_at = None
        await send_transfer(TRANSFER, chunked(data), **core_kw)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    assert b"".join(three.got[i] for i in range(len(three.got))) == data
    assert three.target.notes.get("amst.stream_error", 0) >= 1  # the tampered stream died


async def test_relay_refuses_unknown_targets_itself_and_when_busy() -> None:
    three = Three(limit=0)
    async with trio.open_nursery() as nursery:
        await three.start(nursery)
        with pytest.raises(RelayRefused, match="busy|relays 0"):
            await three.via_x("t")
        three.relay.limit = 4
        with pytest.raises(RelayRefused, match="not a third DC"):
            await three.via_x("nowhere")
        with pytest.raises(RelayRefused, match="not a third DC"):
            await three.via_x("x")
        with pytest.raises(RelayRefused, match="not a third DC"):
            await three.via_x("s")
        three.ports["t"] = _dead_port()
        with pytest.raises(RelayRefused, match="unreachable"):
            await three.via_x("t")
        nursery.cancel_scope.cancel()
    assert three.relay.refused == {"busy": 1, "bad_target": 3, "unreachable": 1}
    assert three.relay.active == 0 and three.relay.accepted == 0


def _dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_migration_follows_a_bulk_route_through_the_third_dc(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    memory = memory_image(tmp_path / "memory.img", 16 << 20)
    disk = ext4_image(tmp_path / "disk.img")
    # dc1 cannot reach dc3's data endpoint directly: only the detour through dc2 works
    view = redirect(cfg, "dc1", {"dc3": _dead_port()})

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data", views={"dc1": view}) as nodes:
            dc1, dc2, dc3, dc4 = (nodes[n] for n in ("dc1", "dc2", "dc3", "dc4"))
            # the round reads the elected bulk route: a detour names its intermediate DC
            election = dc1.control.election
            held = election.routes.get((BULK, "dc3"))
            election.routes[(BULK, "dc3")] = Route(("dc1", "dc2", "dc3"))
            assert dc1.v3.bulk_via("dc3") == "dc2"
            election.routes[(BULK, "dc3")] = Route(("dc1", "dc3"))
            assert dc1.v3.bulk_via("dc3") is None
            election.routes[(BULK, "dc3")] = held
            # and for this test the detour holds whatever the mesh elects meanwhile
            dc1.v3.bulk_via = lambda target: "dc2"  # type: ignore[method-assign]
            await dc1.set_policy(100, kill_switch=False)
            await dc1.import_vm("vm1", memory, [disk])
            await dc1.import_vm("vm2", memory, [disk])

            mid = await migrate_checked(dc1, dc3, "vm1")
            out = dc1.need_core().outcomes[mid]
            assert dc2.v3.relay.relayed_bytes >= out.wire_bytes - out.rounds * 64 * 1024
            assert dc1.rounds.counters.relayed_streams >= 1
            assert dc1.rounds.counters.relay_fallbacks == 0
            # the source's status says which DC carried the migration's streams
            mine = next(m for m in status(dc1)["migrations"] if m["id"] == mid)
            assert list(mine["streams"]) == ["dc2"] and mine["streams"]["dc2"] >= out.rounds
            registry = CollectorRegistry(auto_describe=False)
            registry.register(NodeCollector(dc2))
            families = {m.name: m for m in text_string_to_metric_families(
                generate_latest(registry).decode())}
            relayed = families["dwcp_relayed_bytes"].samples[0]
            assert relayed.name == "dwcp_relayed_bytes_total" and relayed.value > 0

            # the relay refuses (full): the streams go direct, the migration does not mind
            dc2.v3.relay.limit = 0
            before = dc2.v3.relay.relayed_bytes
            mid2 = await dc1.migrate("vm2", "dc4")
            assert await wait_outcome(dc1, mid2) == "committed"
            await wait_vm(dc4, "vm2", "running")
            assert image_hashes(dc4.backend.path("vm2")) == image_hashes(
                dc1.backend.path("vm2"))
            assert dc1.rounds.counters.relay_fallbacks >= 1
            assert dc2.v3.relay.refused.get("busy", 0) >= 1
            # refused by the relay, every stream of this migration went direct
            streams = next(m for m in status(dc1)["migrations"] if m["id"] == mid2)["streams"]
            assert list(streams) == ["direct"], streams
            assert dc2.v3.relay.relayed_bytes == before

    trio.run(main)
