"""The network-namespace harness: veth + tbf shapes traffic and is always torn down; a
FarLink counts every byte between its two sides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.netns import FarLink, NetnsError, TbfLink, netns_missing, time_raw_copy

MISSING = netns_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"network namespaces: {MISSING}")


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_tbf_link_shapes_a_raw_copy_and_is_torn_down(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    stdlib = sorted(Path(socket.__file__).parent.glob("*.py"))  # real bytes, never random
    payload.write_bytes(b"".join(p.read_bytes() for p in stdlib)[: 1 << 20])
    rate_mbit = 20
    # the default names carry this process's pid: another run beside this one (another
    # xdist worker, another checkout) cannot take or tear down the same namespaces
    with TbfLink(rate_mbit=rate_mbit) as link:
        assert link.ns_a in namespaces() and link.ns_b in namespaces()
        result = time_raw_copy(link, payload, port=5299)
        sent = link.tx_bytes("a")
    assert result["bytes"] == 1 << 20
    ideal = (1 << 20) * 8 / (rate_mbit * 1e6)
    # tbf lets one burst (128 KiB) through at line rate, so allow that much early
    assert result["seconds"] >= ideal * 0.8
    assert result["seconds"] < ideal * 10
    assert sent >= 1 << 20  # payload plus headers went out of the a-side veth
    assert link.ns_a not in namespaces() and link.ns_b not in namespaces()


def test_a_failed_setup_leaves_no_namespace_behind() -> None:
    # the namespaces come up, the veth cannot (the name is longer than IFNAMSIZ)
    name = f"dwfail{os.getpid()}-name-longer-than-ifnamsiz"
    with pytest.raises(NetnsError, match="ip link add"):
        TbfLink(rate_mbit=100, name=name).open()
    assert name not in namespaces()


def _far_copy(link: FarLink, nbytes: int) -> float:
    """Seconds to send ``nbytes`` from a process on the far side to this one."""
    with socket.create_server((link.near, 0)) as server:
        port = server.getsockname()[1]
        code = (f"import socket; c = socket.create_connection(({link.near!r}, {port})); "
                f"c.sendall(bytes({nbytes})); c.close()")
        sender = subprocess.Popen([*link.far_prefix(), sys.executable, "-c", code])
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            t, got = time.monotonic(), 0
            with conn:
                while data := conn.recv(1 << 20):
                    got += len(data)
            seconds = time.monotonic() - t
        finally:
            sender.wait(timeout=30)
    assert got == nbytes
    return seconds


@pytest.mark.parametrize("rate_mbit", [None, 50])
def test_a_far_link_counts_what_crosses_it_shapes_it_and_is_torn_down(
        rate_mbit: int | None) -> None:
    nbytes = 1 << 20
    with FarLink(rate_mbit) as link:
        assert link.ns in namespaces() and link.near != link.far
        before = link.tx_bytes()
        seconds = _far_copy(link, nbytes)
        crossed = link.tx_bytes() - before
    # the payload, its TCP/IP headers and the acknowledgements going back
    assert nbytes < crossed < nbytes * 1.2
    if rate_mbit is not None:  # tbf lets one burst (128 KiB) through at line rate
        assert seconds >= nbytes * 8 / (rate_mbit * 1e6) * 0.8
    assert link.ns not in namespaces()
    assert link.near_if not in subprocess.run(["ip", "link"], capture_output=True,
                                            text=True).stdout


def test_a_link_left_over_by_a_killed_run_is_replaced_not_fatal() -> None:
    """A run killed before its ``close`` leaves its namespace and near veth behind; the
    next run whose pid gives the same names deletes them instead of failing."""
    stale = FarLink(None)
    subprocess.run(["ip", "netns", "add", stale.ns], check=True)
    subprocess.run(["ip", "link", "add", stale.near_if, "type", "veth", "peer", "name",
                    "dwstalepeer"], check=True)  # fmt: skip
    try:
        with FarLink(None) as link:
            assert link.ns in namespaces()
        assert link.ns not in namespaces()
        assert link.near_if not in subprocess.run(["ip", "link"], capture_output=True,
                                                  text=True).stdout  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "del", stale.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", stale.near_if], capture_output=True)
