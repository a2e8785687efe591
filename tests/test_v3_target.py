"""The v3 rounds (federation.dataplane.v3_target and v3_source) where the disk or the
migration's images fail under them: a peer's late message when the incoming images are
gone or not writable, a source round that fills the disk."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from federation.dataplane.v3_push import PUSH_FLAG
from federation.dataplane.v3_shadow import SourceState
from federation.dataplane.v3_source import V3RoundSender
from federation.dataplane.v3_target import V3Receiver, _Round, _Store
from federation.migration.round_events import (
    V3Accept,
    V3Accepted,
    V3Failed,
    V3Prepare,
    V3ReceiveFailed,
)
from federation.vms.backend import VmError
from federation.vms.sealing import SealKey
from mesh.hde.events import ChunkArrived
from mesh.runtime.log import JsonLog

MID = "vm1-dc1-dc2-0001"


def _receiver(reports: list[Any], index_of: Any, incoming: Any = None) -> V3Receiver:
    return V3Receiver(backend=None, new_channel=lambda: None,  # type: ignore[arg-type]
                      send=lambda peer, msg: True, incoming=incoming or (lambda mid: None),
                      report=reports.append, log=JsonLog("dc2", io.StringIO()),
                      index_of=index_of)


def test_a_pushed_chunk_after_the_images_went_fails_the_round_not_the_node() -> None:
    """The migration ended here (aborted) while a pushed chunk was on its way: the index
    lookup raises VmError "no incoming image"; the round fails with that reason and the
    receiver carries on (before: the VmError left the node's nursery and ended the node,
    found by make netns-chaos seed 1)."""
    reports: list[Any] = []

    def gone(mid: str, image: str) -> Any:
        raise VmError(f"migration {mid!r}: no incoming image {image!r}")

    receiver = _receiver(reports, gone)
    accept = V3Accept("dc1", MID, 2, b"t" * 16, ("memory",), "vm1")
    r = _Round(receiver, accept, [object()], _Store())  # type: ignore[list-item]

    async def main() -> None:
        await r.chunk(0, b"")  # not a chunk frame: ignored
        await r.step(0, ChunkArrived(1 | PUSH_FLAG, 1, b"x" * 64))

    trio.run(main)
    failed = [x for x in reports if isinstance(x, V3ReceiveFailed)]
    assert len(failed) == 1 and "no incoming image" in failed[0].reason, reports
    assert r.failed


def test_a_round_whose_images_cannot_be_indexed_is_refused() -> None:
    """Accepting a round indexes the incoming images; their disappearance (or a full
    disk) meanwhile is the round's refusal with the reason, not an exception."""
    reports: list[Any] = []

    def full(mid: str, image: str) -> Any:
        raise OSError(28, "No space left on device")

    class Backend:
        def list_vms(self) -> list[Any]:
            return []

    receiver = _receiver(reports, full, incoming=lambda mid: {"memory": object()})
    receiver.backend = Backend()  # type: ignore[assignment]

    async def main() -> None:
        await receiver._accept(V3Accept("dc1", MID, 1, b"t" * 16, ("memory",), "vm1"))

    trio.run(main)
    assert len(reports) == 1 and isinstance(reports[0], V3Accepted), reports
    assert "No space left" in reports[0].error
    assert MID not in receiver.stores


def test_a_source_round_that_fills_the_disk_gives_the_shadow_space_back(
        tmp_path: Path) -> None:
    """ENOSPC in a source round (the shadow of a guest on a small data disk): the round
    fails as any round does, and the shadow's files are removed at once, so the abort's
    ledger write and the node's other writes find room (make netns-chaos seed 5: the
    source's store waited for room behind a shadow nothing removed). Another error keeps
    the shadow for the next round."""
    reports: list[Any] = []

    def sender(fail: BaseException) -> V3RoundSender:
        state = SourceState(tmp_path / "shadow")
        state.reset([("memory", 4)])

        class Failing(V3RoundSender):
            async def _run(self) -> None:
                raise fail

        return Failing(V3Prepare(MID, "vm1", 2, "dc2", 1), None,  # type: ignore[arg-type]
                       state, send=lambda p, m: True, connect=None,  # type: ignore[arg-type]
                       new_channel=lambda: None,  # type: ignore[arg-type,return-value]
                       choose_level=lambda s: ("", 0), report=reports.append)

    full = sender(OSError(errno.ENOSPC, "No space left on device"))
    trio.run(full.run)
    assert isinstance(reports[-1], V3Failed) and "No space" in reports[-1].reason
    assert not (tmp_path / "shadow").exists() and full.state.shadows == {}
    other = sender(OSError(errno.EIO, "I/O error"))
    trio.run(other.run)
    assert isinstance(reports[-1], V3Failed) and "I/O error" in reports[-1].reason
    assert (tmp_path / "shadow" / "memory.img").exists()
    other.state.close()


def test_dropping_a_shadow_whose_last_write_fails_never_raises(tmp_path: Path) -> None:
    """A migration dropped at its source while the disk is full: a shadow's close (its
    last write) fails with ENOSPC; the state lets go of every shadow, removes the
    directory and raises nothing (make netns-chaos seed 10: that OSError ended the node).
    A sealed scratch writer lets go of its descriptor even when its flush fails."""
    state = SourceState(tmp_path / "shadow", SealKey(bytes(range(32))))
    state.reset([("memory", 4), ("disk-0", 4)])
    fds = [w._published.fd for w in state.shadows.values()]  # type: ignore[attr-defined]
    for w in state.shadows.values():
        w.write(0, b"\1" * 4096)

        def full(*_: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        w._chunks.write = full  # type: ignore[attr-defined]
    state.close()
    assert state.shadows == {} and not (tmp_path / "shadow").exists()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
