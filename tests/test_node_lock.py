"""One node per data directory (issue 16 item 1): the second process exits at once with
an error naming the holder's PID, before it reads a byte of the directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from federation.node.data_lock import LOCK_NAME, DataDirBusy, DataDirLock
from tests.harness.node import make_federation
from tests.harness.processes import DWCP_MAIN, NodeProcesses


def test_a_second_lock_names_the_holder_and_a_released_one_is_free(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    with pytest.raises(DataDirBusy, match=f"in use by process {os.getpid()}") as caught:
        DataDirLock(tmp_path)
    assert caught.value.pid == os.getpid()
    first.release()
    again = DataDirLock(tmp_path)  # the file stays behind; the kernel's lock is what counts
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    again.release()


@pytest.mark.processes
def test_a_second_node_process_on_one_data_dir_exits_naming_the_first(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = NodeProcesses(cfg, logs)
    try:
        nodes.start("dc1")
        nodes.wait("dc1 serves /health",
                   lambda: nodes.api("dc1").call("GET", "/health")[0] == 200)
        data = cfg.parent / "data" / "dc1"
        second = subprocess.run(
            [sys.executable, "-c", DWCP_MAIN, "node", "--config", str(cfg), "--name", "dc1"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert second.returncode == 2, second.stderr
        pid = nodes.procs["dc1"].pid
        assert f"data directory {data} is in use by process {pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert nodes.procs["dc1"].poll() is None, "the first node must serve on"
        assert nodes.api("dc1").call("GET", "/health")[0] == 200
    finally:
        nodes.kill_all()
