"""STATUS answers (consensus.pbft.status) and their counters (``status_signed``,
``retransmitted``), which ``dwcp bench consensus`` reports per batch."""

from __future__ import annotations

import attrs

from consensus.pbft import status
from consensus.pbft.messages import PrePrepare, Status
from consensus.pbft.replica import Replica
from mesh import wire
from mesh.core import Send
from sim.hosts.pbft_cluster import SIM_CONFIG, PbftCluster
from sim.scenario import Run, ScenarioSpec
from tests.harness.ledger import register

INTERVAL = SIM_CONFIG.status_interval


def _primary_with_a_batch_in_flight() -> Replica:
    """The primary of view 0 right after it proposed a batch that nobody answered (the
    world never delivers its PRE-PREPARE)."""
    spec = ScenarioSpec("test", lambda r: None, 4, 10.0, 10.0, (), "", 4)
    c = PbftCluster(Run(spec, 1, 4, False), config=attrs.evolve(SIM_CONFIG))
    primary = c.replica("n00")
    assert primary is not None
    actions = primary.submit(1.0, wire.encode(register("vm1", "n00")))[1]
    assert any(isinstance(a, Send) for a in actions), actions
    assert any(s.pp is not None and s.pp.sender == "n00" for s in primary.state.slots.values())
    return primary


def _answer(replica: Replica, now: float, last_executed: int) -> list[object]:
    st = replica.state
    status.on_status(st, replica._out, now, "n01", Status(st.view, True, last_executed, 0))
    return [a.message for a in replica._out.flush() if isinstance(a, Send)]


def test_a_peer_at_our_height_gets_our_messages_of_the_batches_in_flight() -> None:
    primary = _primary_with_a_batch_in_flight()
    sent = _answer(primary, 1.0 + INTERVAL, primary.state.last_exec)
    assert any(isinstance(wire.decode(env.body), PrePrepare) for env in sent)  # type: ignore[attr-defined]
    assert primary.metrics["retransmitted"] == len(sent)
    # at most one answer per peer and status interval
    assert _answer(primary, 1.0 + INTERVAL + INTERVAL / 2, primary.state.last_exec) == []


def test_a_peer_behind_gets_our_status_not_our_batch() -> None:
    primary = _primary_with_a_batch_in_flight()
    signed = primary.metrics.get("status_signed", 0)
    primary.state.last_exec = 3  # we are ahead of the peer
    sent = _answer(primary, 1.0 + INTERVAL, 2)
    assert [type(wire.decode(env.body)) for env in sent] == [Status]  # type: ignore[attr-defined]
    assert primary.metrics["status_signed"] == signed + 1
