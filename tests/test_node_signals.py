"""SIGUSR2 (a heap_report request) while a node serves or stops never ends it.

``dwcp bench soak`` asks its nodes for a heap_report with SIGUSR2 every 30 s; one came
while dc1 was stopping on SIGTERM, after the reporter's receiver had closed, and the
default action ended the node (exit -12; soak on cec21d5, 2,705 s). ``dwcp node`` now
ignores SIGUSR2 from the start of ``run_node`` (before that, while Python itself starts,
no process can catch it) outside the reporter's receiver."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.harness.node import make_federation
from tests.harness.processes import NodeProcesses


def test_sigusr2_during_start_serving_and_stop_is_harmless(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path, count=4)
    logs = tmp_path / "logs"
    logs.mkdir()
    nodes = NodeProcesses(cfg, logs)
    log = logs / "dc1.log"
    try:
        nodes.start("dc1")
        proc = nodes.procs["dc1"]
        nodes.wait("dc1 listening", lambda: '"event":"listening"' in log.read_text())
        for _ in range(5):  # while it serves: each a heap_report line, if asked for
            proc.send_signal(signal.SIGUSR2)
            time.sleep(0.05)
        assert proc.poll() is None
        deadline = time.monotonic() + 60
        proc.send_signal(signal.SIGTERM)
        # and through its shutdown
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGUSR2)
            time.sleep(0.005)
        assert proc.wait(timeout=30) == 0
    finally:
        nodes.kill_all()
