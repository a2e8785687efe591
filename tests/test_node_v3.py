"""The v3 data plane in assembled nodes (in-process, real TCP on loopback): HDE over AMST
on the data endpoints, with the rollout policy and the handshake choosing v3 or v1."""

from __future__ import annotations

import io
import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from federation.demo.guest_writer import expected_pages, mismatches
from federation.node.assembly import Node
from federation.node.status import status
from federation.vms.backend import VmState
from tests.harness.node import (
    image_hashes,
    import_vm,
    import_with_writer,
    make_federation,
    migrate,
    real_vm,
    running_nodes,
    set_policy,
    signed,
    wait_outcome,
    wait_vm,
    wait_writes,
)
from tests.harness.waiting import wait_until

NAMES = ("dc1", "dc2", "dc3", "dc4")


def nodes_with(cfg: Path, data: Path, versions: dict[str, tuple[int, ...]],
               ) -> AbstractAsyncContextManager[dict[str, Node]]:
    """The four nodes in this process, ``versions[name]`` limiting what a node offers."""
    return running_nodes(cfg, data, NAMES, versions)


def _writer_pages_intact(node: Node, source: Node, vm: str) -> None:
    log = expected_pages(source.backend.path(vm) / "writer.log")
    assert log, "the writer wrote nothing: pre-copy rounds were not exercised"
    images = node.backend.open_images(vm)
    try:
        assert mismatches(images, log) == []
    finally:
        for img in images.values():
            img.close()


def _round_figures(node: Node, mid: str) -> dict[int, dict[str, object]]:
    """The ``round_sent`` log records of migration ``mid`` at its source ``node``, by
    round (the harness logs to a StringIO)."""
    out = {}
    stream = node.log._stream
    assert isinstance(stream, io.StringIO)
    for line in stream.getvalue().splitlines():
        if '"round_sent"' in line and mid in line:
            rec = json.loads(line)
            if rec.get("event") == "round_sent" and rec.get("migration_id") == mid:
                out[rec["round"]] = rec
    return out


def test_v3_migration_then_back_then_v1_fallback(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")
    logical_size = memory.stat().st_size + disk.stat().st_size

    async def main() -> None:
        # dc4 carries only v1 (a DC rolled back): links to it negotiate v1
        async with nodes_with(cfg, tmp_path / "data", {"dc4": (1,)}) as nodes:
            dc1, dc3, dc4 = nodes["dc1"], nodes["dc3"], nodes["dc4"]
            assert dc1.runtime.links["dc3"].version == 3
            assert dc1.runtime.links["dc4"].version == 1
            await set_policy(dc1, 100)
            await import_with_writer(dc1, "vm1", memory, [disk], rate=300, seed=3)
            await import_vm(dc1, "vm2", memory, [disk])
            await wait_writes(dc1, "vm1")  # dirty pages before the migration starts

            # v3: dc1 -> dc3 with the writer running
            mid = await migrate(dc1, "vm1", "dc3")
            assert await wait_outcome(dc1, mid) == "committed"
            assert await wait_outcome(dc3, mid) == "committed"
            await wait_vm(dc3, "vm1", "running")
            await wait_vm(dc1, "vm1", "retired")
            assert image_hashes(dc3.backend.path("vm1")) == image_hashes(dc1.backend.path("vm1"))
            _writer_pages_intact(dc3, dc1, "vm1")
            # dc3 held no copy of vm1: round 1 streamed every image as it was read
            # (v3_push.StreamSource), the later rounds pushed
            figures = _round_figures(dc1, mid)
            assert figures[1]["streamed"] == len(dc1.backend.info("vm1").layout), figures[1]
            assert figures[1]["pushed"] == 0
            out = dc1.need_core().outcomes[mid]
            assert dc1.rounds.counters.paths[mid] == {"v3": out.rounds}
            assert out.bytes_sent >= logical_size
            assert 0 < out.wire_bytes < out.bytes_sent, (out.wire_bytes, out.bytes_sent)
            counters = dc1.rounds.counters
            assert counters.version(3).rounds == out.rounds and counters.version(1).rounds == 0
            assert counters.version(3).wire_bytes == out.wire_bytes
            assert dc3.rounds.counters.chunks_received > 0
            doc = status(dc1)
            mine = next(m for m in doc["migrations"] if m["id"] == mid)
            assert mine["data_plane"] == {"v3": out.rounds} and mine["version"] == 3
            # every bulk stream of the rounds went straight to dc3 (no relay on the route)
            assert list(mine["streams"]) == ["direct"] and mine["streams"]["direct"] >= out.rounds

            # back dc3 -> dc1: dc1 still holds its retired copy, so round 1 is a diff
            # against it and only what the writer changed crosses
            back = await migrate(dc3, "vm1", "dc1")
            assert await wait_outcome(dc3, back) == "committed"
            await wait_vm(dc1, "vm1", "running")
            assert image_hashes(dc1.backend.path("vm1")) == image_hashes(dc3.backend.path("vm1"))
            again = dc3.need_core().outcomes[back]
            # ... and not streamed: dc1 said it holds its old copy (V3Held), the diff found it
            assert _round_figures(dc3, back)[1]["streamed"] == 0
            assert dc3.rounds.counters.paths[back] == {"v3": again.rounds}
            assert again.wire_bytes < again.bytes_sent / 10, (again.wire_bytes,
                                                              again.bytes_sent)

            # v1 fallback: dc4 offers only v1, so the handshake settles on it despite v3 100 %
            fb = await migrate(dc1, "vm2", "dc4")
            assert await wait_outcome(dc1, fb) == "committed"
            await wait_vm(dc4, "vm2", "running")
            assert image_hashes(dc4.backend.path("vm2")) == image_hashes(dc1.backend.path("vm2"))
            v1 = dc1.need_core().outcomes[fb]
            assert dc1.rounds.counters.paths[fb] == {"v1": v1.rounds}
            assert v1.wire_bytes > v1.bytes_sent  # v1: every page as it is, plus framing
            assert dc4.backend.info("vm2").state is VmState.RUNNING

    trio.run(main)


async def _roll_back_by_the_ledger(dc1: Node) -> None:
    """What a v3 verification failure elsewhere does under a policy that rolls back at the
    first one: dc1 begins a v3 migration of another VM of its own and states its abort for
    a failed verification; the ledger turns the kill switch on by itself."""
    from consensus.ledger import (
        AbortMigration,
        BeginMigration,
        ImportVm,
        MigrateVm,
        RegisterVm,
    )

    other = f"other-{len(dc1.need_core().ledger.vms)}"
    result = await dc1.ledger.submit(RegisterVm(other, "dc1", signed(
        dc1, "POST", "/api/vms", ImportVm(other, "dc1", "/nowhere"))))
    assert result.ok, result.error
    mid = f"{other}-dc1-dc3"
    result = await dc1.ledger.submit(BeginMigration(other, "dc1", "dc3", 0, mid, signed(
        dc1, "POST", "/api/migrations", MigrateVm(other, "dc3", "dc1", 0)), 3))
    assert result.ok, result.error
    result = await dc1.ledger.submit(AbortMigration(
        mid, None, "the target dc3 gave up: the root of the received images does not "
        "match the root the source announced", "verification"))
    assert result.ok, result.error


@pytest.mark.parametrize("how", ["kill_switch", "automatic_rollback"])
def test_kill_switch_mid_migration_falls_back_to_v1(tmp_path: Path, monkeypatch,
                                                    how: str) -> None:
    """The rollout's kill switch lands after a v3 round — set by an admin, or by the ledger
    itself when a v3 migration elsewhere fails verification under a policy that rolls back
    at the first failure: the rest of the transfer goes v1, on top of what v3 delivered,
    and the target still ends with the source's images."""
    from consensus.ledger import SetPolicy
    from federation.dataplane.v3_source import V3RoundSender

    cfg = make_federation(tmp_path / "fed")
    memory, disk = real_vm(tmp_path / "vm")
    switched: list[int] = []

    async def main() -> None:
        async with nodes_with(cfg, tmp_path / "data", {}) as nodes:
            dc1, dc2 = nodes["dc1"], nodes["dc2"]
            real_drive = V3RoundSender._drive

            async def drive_then_kill(self: V3RoundSender, sources, feed):  # type: ignore[no-untyped-def]
                await real_drive(self, sources, feed)
                if not switched:  # the policy changes before the session hears of round 1
                    switched.append(self.round)
                    if how == "kill_switch":
                        await set_policy(dc1, 100, kill_switch=True)
                    else:
                        await _roll_back_by_the_ledger(dc1)
                    await wait_until(
                        lambda: dc1.need_core().ledger.policy.kill_switch,
                        "the kill switch in dc1's ledger")

            monkeypatch.setattr(V3RoundSender, "_drive", drive_then_kill)
            if how == "kill_switch":
                await set_policy(dc1, 100, kill_switch=False)
            else:
                policy = SetPolicy(100, (), (), False, max_verify_failures=1)
                await dc1.set_policy(policy, authorization=signed(dc1, "POST", "/api/policy",
                                                                  policy))
            await import_with_writer(dc1, "vm3", memory, [disk], rate=300, seed=11)
            await wait_writes(dc1, "vm3")
            mid = await migrate(dc1, "vm3", "dc2")
            assert await wait_outcome(dc1, mid) == "committed"
            await wait_vm(dc2, "vm3", "running")
            await wait_vm(dc1, "vm3", "retired")
            assert image_hashes(dc2.backend.path("vm3")) == image_hashes(dc1.backend.path("vm3"))
            _writer_pages_intact(dc2, dc1, "vm3")
            out = dc1.need_core().outcomes[mid]
            assert switched == [1]
            assert dc1.rounds.counters.paths[mid] == {"v3": 1, "v1": out.rounds - 1}
            assert dc1.need_core().sessions[mid].version == 1
            if how == "automatic_rollback":
                for node in nodes.values():  # every DC's ledger rolled back at one entry
                    await wait_until(lambda node=node: node.need_core().ledger.policy
                                     .rolled_back.startswith("1 v3 migration failed "
                                                             "verification"),
                                     f"the rollback in {node.name}'s ledger")
            # the v3 state of the migration was dropped when it ended
            await wait_until(lambda: mid not in dc1.v3.sender.sources
                             and not list((dc1.data_dir / "v3-shadow").glob("*")),
                             "dc1 dropped the migration's v3 source state")
            await wait_until(lambda: not dc2.v3.receiver.rounds
                             and not dc2.v3.receiver.server.transfers,
                             "dc2 dropped the migration's v3 receive state")

    trio.run(main)


def _ext4(path: Path, source: str, mib: int) -> Path:
    import shutil
    import subprocess

    import pytest

    mke2fs = shutil.which("mke2fs") or shutil.which("/usr/sbin/mke2fs")
    if mke2fs is None or not Path(source).is_dir():
        pytest.skip(f"needs mke2fs and {source} to build a real disk image")
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext4", "-d", source, str(path), f"{mib}M"],
                   check=True, capture_output=True)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("percent", [100, 0], ids=["v3", "v1"])
def test_64mib_figures(tmp_path: Path, percent: int) -> None:
    """A 64 MiB VM (48 MiB of this process's memory, a 16 MiB ext4 of four stdlib packages)
    migrates with its writer running, over v3 (rollout 100 %) or v1 (0 %); prints figures."""
    from tests.harness.node import memory_image

    cfg = make_federation(tmp_path / "fed")
    (tmp_path / "vm").mkdir()
    tree = tmp_path / "tree"
    import shutil

    for pkg in ("email", "json", "asyncio", "unittest"):
        shutil.copytree(f"/usr/lib/python3.11/{pkg}", tree / pkg)
    memory = memory_image(tmp_path / "vm" / "memory.img", 48 << 20)
    disk = _ext4(tmp_path / "vm" / "disk.img", str(tree), 16)
    logical = memory.stat().st_size + disk.stat().st_size

    async def main() -> dict[str, float]:
        async with nodes_with(cfg, tmp_path / "data", {}) as nodes:
            dc1, dc3 = nodes["dc1"], nodes["dc3"]
            await set_policy(dc1, percent, kill_switch=False)
            await import_with_writer(dc1, "big", memory, [disk], rate=2000, seed=5)
            await wait_writes(dc1, "big", 1000)
            t0 = trio.current_time()
            mid = await migrate(dc1, "big", "dc3")
            assert await wait_outcome(dc1, mid, timeout=120) == "committed"
            total = trio.current_time() - t0
            await wait_vm(dc3, "big", "running")
            await wait_vm(dc1, "big", "retired")
            assert image_hashes(dc3.backend.path("big")) == image_hashes(dc1.backend.path("big"))
            _writer_pages_intact(dc3, dc1, "big")
            out = dc1.need_core().outcomes[mid]
            version = "v3" if percent else "v1"
            assert dc1.rounds.counters.paths[mid] == {version: out.rounds}
            assert (out.wire_bytes < out.bytes_sent) == (version == "v3")
            return {"version": version, "image_bytes": logical, "rounds": out.rounds,
                    "logical_bytes": out.bytes_sent, "wire_bytes": out.wire_bytes,
                    "wire_fraction": round(out.wire_bytes / out.bytes_sent, 4),
                    "downtime_s": round(out.fenced_seconds, 3), "total_s": round(total, 3)}

    print("64 MiB migration:", trio.run(main))
