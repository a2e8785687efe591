"""A cut v3 data path: the source resumes the round's AMST transfer instead of aborting the
migration, re-sending nothing the target already stored, and aborts (the VM stays at its
source) only when the cut outlasts the resume budget.

Nodes run in this process on loopback (tests.harness.node). The source's federation file
places the target's data endpoint at a relay this test controls (:class:`CutRelay`), as a
port forward would: the relay splices TCP, counts the bytes it carries and, at set byte
counts, resets every connection and refuses new ones for a while.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import trio

from federation.dataplane.v3_protocol import ChunkFeed
from federation.vms.backend import VmState
from mesh.amst.receiver import ChunkSet
from mesh.hde.codec import ChunkPlan
from mesh.hde.events import EncodeChunk
from tests.harness.node import (
    data_port,
    ext4_image,
    image_hashes,
    import_vm,
    make_federation,
    memory_image,
    migrate,
    migrate_checked,
    redirect,
    running_nodes,
    set_policy,
    wait_outcome,
    wait_vm,
)

NAMES = ("dc1", "dc2", "dc3", "dc4")


class CutRelay:
    """A loopback TCP relay to ``port`` that counts the bytes it forwards (both ways) and
    cuts: at each byte count in ``cuts`` it resets every connection and resets new ones
    for ``down_for`` seconds (forever if None)."""

    def __init__(self, port: int, cuts: tuple[int, ...] = (), down_for: float | None = 1.0,
                 ) -> None:
        self.port = port
        self.cuts = list(cuts)
        self.down_for = down_for
        self.bytes = 0
        self.connections = 0
        self.resets = 0  # connections refused (reset) while down
        self.killed = 0  # live connections reset by a cut
        self.down = False
        self.listen_port = 0
        self._scopes: list[trio.CancelScope] = []
        self._nursery: trio.Nursery | None = None

    async def start(self, nursery: trio.Nursery) -> int:
        self._nursery = nursery
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.listen_port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)
        return self.listen_port

    def cut(self) -> None:
        self.down = True
        self.killed += len(self._scopes)
        for scope in self._scopes:
            scope.cancel()
        if self.down_for is not None and self._nursery is not None:
            self._nursery.start_soon(self._come_back, self.down_for)

    async def _come_back(self, after: float) -> None:
        await trio.sleep(after)
        self.down = False

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.down:
            self.resets += 1
            await _reset(client)
            return
        self.connections += 1
        upstream = await trio.open_tcp_stream("127.0.0.1", self.port)
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream)
                nursery.start_soon(self._pump, upstream, client)
        self._scopes.remove(scope)
        await _reset(client)
        await _reset(upstream)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                await dst.send_all(data)
                self.bytes += len(data)
                if self.cuts and self.bytes >= self.cuts[0]:
                    self.cuts.pop(0)
                    self.cut()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the other side went away: its pump ends the splice
        with trio.CancelScope(shield=True):
            await dst.send_eof()  # type: ignore[attr-defined]


async def _reset(stream: trio.SocketStream) -> None:
    """Close with an RST, as a crashed or rebooted peer does (SO_LINGER with time 0)."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed
    with trio.CancelScope(shield=True):
        await stream.aclose()


def test_cut_data_path_resumes_without_resending_what_the_target_stored(tmp_path: Path,
                                                                         ) -> None:
    cfg = make_federation(tmp_path / "fed")
    memory = memory_image(tmp_path / "memory.img", 40 << 20)
    disk = ext4_image(tmp_path / "disk.img")

    async def main() -> None:
        async with trio.open_nursery() as relays:
            clean = CutRelay(data_port(cfg, "dc3"))
            cut = CutRelay(data_port(cfg, "dc4"), down_for=1.0)
            view = redirect(cfg, "dc1", {"dc3": await clean.start(relays),
                                         "dc4": await cut.start(relays)})
            async with running_nodes(cfg, tmp_path / "data", views={"dc1": view}) as nodes:
                dc1, dc3, dc4 = nodes["dc1"], nodes["dc3"], nodes["dc4"]
                await set_policy(dc1, 100, kill_switch=False)
                await import_vm(dc1, "vm1", memory, [disk])
                await import_vm(dc1, "vm2", memory, [disk])

                # a clean run through a relay that never cuts: the yardstick
                mid = await migrate_checked(dc1, dc3, "vm1")
                base = dc1.need_core().outcomes[mid]
                assert clean.bytes > 0 and clean.killed == clean.resets == 0

                # the same images to a DC that holds nothing of them, the data path reset
                # twice in the middle of round 1 and unreachable for a second each time
                cut.cuts = [clean.bytes * 3 // 10, clean.bytes * 6 // 10]
                rounds_before = dc1.rounds.counters.rounds_failed
                mid2 = await migrate_checked(dc1, dc4, "vm2")
                assert await wait_outcome(dc4, mid2) == "committed"
                out = dc1.need_core().outcomes[mid2]
                print("clean run:", clean.bytes, "relayed bytes,", base.wire_bytes,
                      "wire bytes; cut twice:", cut.bytes, "relayed,", out.wire_bytes, "wire")
                assert cut.cuts == [] and cut.killed > 0, "both cuts happened mid-transfer"
                assert dc1.rounds.counters.rounds_failed == rounds_before
                # what crossed: the clean run's bytes plus the chunks cut in half, no more
                assert cut.bytes < 2 * clean.bytes, (cut.bytes, clean.bytes)
                assert out.wire_bytes < 2 * base.wire_bytes, (out.wire_bytes, base.wire_bytes)
            relays.cancel_scope.cancel()

    trio.run(main)


def test_a_cut_that_outlasts_the_budget_aborts_and_the_vm_stays(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    memory = memory_image(tmp_path / "memory.img", 16 << 20)
    disk = ext4_image(tmp_path / "disk.img")

    async def main() -> None:
        async with trio.open_nursery() as relays:
            dead = CutRelay(data_port(cfg, "dc2"), down_for=None)
            view = redirect(cfg, "dc1", {"dc2": await dead.start(relays)})
            async with running_nodes(cfg, tmp_path / "data", views={"dc1": view}) as nodes:
                dc1, dc2 = nodes["dc1"], nodes["dc2"]
                dc1.rounds.core.resume_budget = 2.0  # the default (15 s) is too long for a test
                await set_policy(dc1, 100, kill_switch=False)
                await import_vm(dc1, "vm1", memory, [disk])
                before = image_hashes(dc1.backend.path("vm1"))
                dead.cuts = [64 << 10]  # after the first 64 KiB, never again
                t0 = trio.current_time()
                mid = await migrate(dc1, "vm1", "dc2")
                outcome = await wait_outcome(dc1, mid)
                assert outcome.startswith("aborted") and "cut for" in outcome, outcome
                assert trio.current_time() - t0 < 30  # the budget ended it, not a stall timer
                assert (await wait_outcome(dc2, mid)).startswith("aborted")
                await wait_vm(dc1, "vm1", "running")
                assert dc1.backend.info("vm1").state is VmState.RUNNING
                assert image_hashes(dc1.backend.path("vm1")) == before
                assert all(i.name != "vm1" or i.state is not VmState.RUNNING
                           for i in dc2.backend.list_vms())
                assert dc1.rounds.counters.rounds_failed == 1
            relays.cancel_scope.cancel()

    trio.run(main)


def test_feed_resumes_with_the_frames_not_acknowledged_held_ones_first() -> None:
    """A cut sender prepared chunks 0-3 (0 and 2 acknowledged) and handed out 4 without
    preparing it; the resumed sender gets 1 and 3 with their very frames, then 4 (the next
    plan), then new ids; acknowledged frames are let go."""
    encoded: list[int] = []

    def encode(image: int, e: EncodeChunk, level: int) -> bytes:
        encoded.append(e.plan.chunk_id)
        return b"HDE frame %d" % e.plan.chunk_id

    feed = ChunkFeed(encode)
    for c in range(6):
        feed.put(0, EncodeChunk(1, ChunkPlan(c, (c, 1)), None))
    first = ChunkSet()
    feed.bind(first)

    async def main() -> dict[int, bytes]:
        frames = {}
        for _ in range(4):
            got = feed.next_chunk(1 << 20)
            assert got is not None
            frames[got[0]] = await trio.to_thread.run_sync(feed.prepare, got[0], got[1])
        assert feed.next_chunk(1 << 20) is not None  # id 4: handed out, never prepared
        first.add(0)
        first.add(2)
        feed.resume()
        assert feed.held == 2  # 1 and 3: 0 and 2 are acknowledged, 4 was never prepared
        again = ChunkSet()
        feed.bind(again)
        order = []
        for _ in range(4):
            got = feed.next_chunk(1 << 20)
            assert got is not None
            order.append(got[0])
            frames[got[0]] = await trio.to_thread.run_sync(feed.prepare, got[0], got[1])
        assert order == [1, 3, 4, 5]
        return frames

    frames = trio.run(main)
    assert encoded == [0, 1, 2, 3, 4, 5]  # nothing encoded twice
    assert frames[1] == b"HDE frame 1" and frames[3] == b"HDE frame 3"
    assert frames[4] == b"HDE frame 4" and frames[5] == b"HDE frame 5"
    assert feed.replayed == 2 and feed.replayed_bytes == 2 * len(b"HDE frame 1")
    assert feed.frames == 6
