"""Real ``dwcp node`` processes on loopback with one node of the old style (issue 14):
dc4 runs with ``[control] framing = "websocket"`` (it offers no CONTROL_FRAMES, as a
node of an older build), the other three switch to our own framing among themselves
and keep the websocket with dc4; the ledger orders requests made at a framed node and
at dc4 alike, and SIGTERM closes every link cleanly, final frame for final frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from consensus.ledger import SetPolicy
from tests.harness.processes import NAMES, node_processes

OLD = "dc4"


def _node_config(dc: str) -> str:
    return '[control]\nframing = "websocket"\n' if dc == OLD else ""


@pytest.mark.processes
def test_three_framed_nodes_and_one_websocket_node_agree_and_close_cleanly(
        tmp_path: Path) -> None:
    with node_processes(tmp_path, node_config=_node_config) as nodes:
        def framings() -> dict[str, dict[str, str]]:
            return {n: {e["peer"]: e["framing"] for e in nodes.log_events(n, "peer_up")}
                    for n in NAMES}

        want = {n: {p: "websocket" if OLD in (n, p) else "frames" for p in NAMES if p != n}
                for n in NAMES}
        nodes.wait("every link up in its framing", lambda: framings() == want)
        nodes.api("dc1").ok("POST", "/api/policy", SetPolicy(30, ("dc2",), (), False))
        nodes.api(OLD).ok("POST", "/api/policy", SetPolicy(60, ("dc3",), (), False))

        def agreed() -> bool:
            heights = {nodes.status(n)["ledger"]["height"] for n in NAMES}
            policies = {nodes.api(n).ok("GET", "/api/policy")["v3_percent"] for n in NAMES}
            return len(heights) == 1 and policies == {60}

        nodes.wait("every ledger at one height with dc4's policy", agreed)
        assert nodes.stop_all() == {n: 0 for n in NAMES}
        for n in NAMES:
            closed = nodes.log_events(n, "link_closed")
            assert closed, n
            assert all(e["reason"] == "clean" for e in closed), (n, closed)
            assert not nodes.log_events(n, "ws_protocol_error"), n
