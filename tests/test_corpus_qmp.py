"""The QMP client against a scripted monitor, and the guest scripts' shell syntax."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.corpus import sources
from federation.vms.qmp import QMPClient, QMPError

Reply = dict[str, Any]


def monitor(path: Path, script: list[tuple[str, list[Reply]]]) -> threading.Thread:
    """A fake QMP server: greeting, then for each expected command its replies."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            opening: list[tuple[str, list[Reply]]] = [("qmp_capabilities", [{"return": {}}])]
            for command, replies in opening + script:
                line = f.readline()
                assert json.loads(line)["execute"] == command
                for r in replies:
                    f.write(json.dumps(r).encode() + b"\n")
                f.flush()
            f.readline()  # hold the connection until the client closes it
        server.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_qmp_returns_results_keeps_events_and_raises_errors(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    done: Reply = {"event": "MIGRATION", "data": {"status": "completed"}}
    t = monitor(path, [
        ("query-status", [{"event": "STOP"}, {"return": {"status": "paused"}}]),
        ("cont", [{"error": {"class": "GenericError", "desc": "not allowed"}}]),
        ("migrate", [{"return": {}}, {"event": "MIGRATION", "data": {"status": "active"}},
                     done]),
    ])  # fmt: skip
    qmp = QMPClient(path)
    assert qmp.execute("query-status") == {"status": "paused"}
    assert [e["event"] for e in qmp.events] == ["STOP"]
    with pytest.raises(QMPError, match="cont: not allowed"):
        qmp.execute("cont")
    qmp.execute("migrate", uri="tcp:127.0.0.1:1")
    assert qmp.wait_event("MIGRATION", 5, status="completed") == done
    with pytest.raises(QMPError, match="no MIGRATION event"):
        qmp.wait_event("MIGRATION", 0.2, status="completed")
    qmp.close()
    t.join(5)


def test_qmp_names_a_missing_monitor(tmp_path: Path) -> None:
    with pytest.raises(QMPError, match="no QMP monitor"):
        QMPClient(tmp_path / "absent.sock", connect_timeout=0.1)


@pytest.mark.parametrize("name", sources.GUEST_FILES)
def test_guest_scripts_are_valid_shell(name: str) -> None:
    out = subprocess.run(["sh", "-n", str(sources.HERE / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
