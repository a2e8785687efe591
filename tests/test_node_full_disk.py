"""A node restarted while its disk is full waits for room instead of exiting.

netns-chaos seed 59 (77d346f): dc4 was restarted and its tmpfs filled as it started;
opening node.sqlite3 failed with "disk I/O error" (SQLITE_IOERR_SHMSIZE: WAL mode's
shared-memory index could not be allocated) and the node exited with 2. Opening the
store on a full disk now raises StoreFull, and ``dwcp node`` logs ``store_full`` and
tries again until room is made (or a signal stops it, exit 0)."""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.runtime.sqlite_store import SQLiteStore, StoreError, StoreFull
from tests.harness.node import make_federation
from tests.harness.processes import NodeProcesses
from tests.harness.tmpfs import mounted_tmpfs
from tests.harness.waiting import poll_until


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    with mounted_tmpfs("16m") as d:
        yield d


def fill(directory: Path) -> Path:
    """Fill ``directory``'s file system to the last block; the filler's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * (1 << 16)
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    return filler


def test_opening_the_store_on_a_full_disk_is_store_full(tmpfs: Path) -> None:
    path = tmpfs / "node.sqlite3"
    store = SQLiteStore(path)
    store.put("k", b"v" * 1000)
    store.close()
    filler = fill(tmpfs)
    with pytest.raises(StoreFull, match="the disk is full"):
        SQLiteStore(path)
    filler.unlink()
    again = SQLiteStore(path)
    assert again.get("k") == b"v" * 1000  # nothing of it was changed
    again.close()


def test_a_store_that_cannot_be_opened_for_another_reason_is_not_store_full(
        tmp_path: Path) -> None:
    bad = tmp_path / "node.sqlite3"
    bad.write_bytes(b"not a database" * 512)
    with pytest.raises(StoreError) as err:
        SQLiteStore(bad)
    assert not isinstance(err.value, StoreFull)


def _log_has(log: Path, text: str) -> bool:
    return log.exists() and text in log.read_text(errors="replace")


def test_a_node_restarted_on_a_full_disk_waits_and_comes_up(tmp_path: Path,
                                                           tmpfs: Path) -> None:
    cfg = make_federation(tmp_path, count=4)
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = NodeProcesses(cfg, logs)
    data = tmpfs / "dc1"
    argv = ["node", "--config", str(cfg), "--name", "dc1", "--data-dir", str(data)]
    log = logs / "dc1.log"
    try:
        nodes.start("dc1", argv=argv)
        nodes.wait("dc1 listening", lambda: _log_has(log, '"event":"listening"'))
        assert nodes.stop("dc1") == 0
        filler = fill(tmpfs)
        nodes.start("dc1", argv=argv)
        poll_until(lambda: log.read_text().count('"event":"store_full"') >= 2,
                   "dc1 waiting for room", timeout=60)
        assert nodes.procs["dc1"].poll() is None, "the node exited on the full disk"
        filler.unlink()
        nodes.wait("dc1 up once there is room",
                   lambda: log.read_text().count('"event":"listening"') >= 2, timeout=60)
        assert nodes.stop("dc1") == 0
        # stopped while it waits: a clean exit, nothing started
        filler = fill(tmpfs)
        nodes.start("dc1", argv=argv)
        poll_until(lambda: log.read_text().count('"event":"store_full"') >= 3,
                   "dc1 waiting for room again", timeout=60)
        proc = nodes.procs["dc1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "while waiting for room" in log.read_text()
        filler.unlink()
    finally:
        nodes.kill_all()

