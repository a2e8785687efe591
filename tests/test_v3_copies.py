"""HDE chunk copies between nodes (mesh.versions.HDE_COPIES): in-process nodes, real TCP
on loopback. A pre-copy round in which the guest wrote one new page to many pages sends
it once when the target offered the capability on its data channels, and in full per
page when it did not (an older build); the VM arrives whole either way."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import trio

import federation.dataplane.v3_source as v3_source
from federation.dataplane.v3_source import V3RoundSender
from federation.vms.image_backend import ImageBackend
from mesh import versions
from mesh.hde.image import PAGE_SIZE
from tests.harness.node import (
    image_hashes,
    import_vm,
    make_federation,
    migrate,
    running_nodes,
    set_policy,
    wait_outcome,
    wait_vm,
)

PAGES = 1024
#: pages the guest writes the same new page to during round 1 (far apart)
SAME = list(range(3, PAGES, 16))


@pytest.mark.parametrize("offered", [True, False])
def test_pushed_rounds_send_equal_pages_once_only_if_the_target_offers_copies(
        tmp_path: Path, offered: bool, monkeypatch: Any) -> None:
    cfg = make_federation(tmp_path / "fed")
    (tmp_path / "vm").mkdir()
    memory = tmp_path / "vm" / "memory.img"
    memory.write_bytes(random.Random(7).randbytes(PAGES * PAGE_SIZE))
    asked: list[tuple[bool, int]] = []  # (copies, the plan's pages) of every pushed chunk
    real_encode = v3_source.encode_chunk
    real_refresh = V3RoundSender._refresh
    written: list[str] = []

    def recording(transfer: int, plan: Any, image: Any, ref: Any, lvl: int, *,
                  copies: bool = False) -> bytes | bytearray:
        # the pushed rounds' chunks (XORed against what the target verified); round 1,
        # streamed to the cold dc3 with no reference, cannot know the offer yet
        if v3_source.is_push(transfer) and ref is not None:
            asked.append((copies, plan.count))
        return real_encode(transfer, plan, image, ref, lvl, copies=copies)

    def refresh(self: V3RoundSender) -> Any:
        out = real_refresh(self)
        # the running guest writes once round 1 took its mark: one page, many places,
        # sent by the next (pushed) round
        if self.action.since is None and not written:
            path = self.backend.path(self.action.vm) / "memory.img"
            page = random.Random(8).randbytes(PAGE_SIZE)
            fd = os.open(path, os.O_WRONLY)
            try:
                for p in SAME:
                    os.pwrite(fd, page, p * PAGE_SIZE)
            finally:
                os.close(fd)
            assert isinstance(self.backend, ImageBackend)
            for p in SAME:
                self.backend.note_write(self.action.vm, "memory", p)
            written.append(self.action.vm)
        return out

    monkeypatch.setattr(v3_source, "encode_chunk", recording)
    monkeypatch.setattr(V3RoundSender, "_refresh", refresh)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1, dc3 = nodes["dc1"], nodes["dc3"]
            if not offered:  # dc3 runs a build whose decoder predates the flag
                dc3.v3.capabilities = (versions.AMST_SEALED,)
            await set_policy(dc1, 100)
            await import_vm(dc1, "vm1", memory, [])
            mid = await migrate(dc1, "vm1", "dc3")
            assert await wait_outcome(dc1, mid) == "committed"
            await wait_vm(dc3, "vm1", "running")
            assert image_hashes(dc3.backend.path("vm1")) == image_hashes(dc1.backend.path("vm1"))
            assert dc1.rounds.counters.paths[mid] == {"v3": dc1.need_core().outcomes[mid].rounds}

    trio.run(main)
    assert written == ["vm1"], "no round after round 1: the pushed path was not exercised"
    assert sum(n for _, n in asked) >= len(SAME), asked
    assert {c for c, _ in asked} == {offered}, asked
