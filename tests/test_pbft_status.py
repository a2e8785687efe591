"""STATUS answers (consensus.pbft.status): a peer at our height gets our messages of the
sequence numbers in progress only once one of the two stands still."""

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


def _primary_with_a_batch_in_flight() -> tuple[Replica, float]:
    """The primary of view 0 right after it proposed a batch that nobody answered (the
    world never delivers its PRE-PREPARE), having executed a first batch at t = 1."""
    spec = ScenarioSpec("test", lambda r: None, 4, 10.0, 10.0, (), "", 4)
    c = PbftCluster(Run(spec, 1, 4, False), config=attrs.evolve(SIM_CONFIG))
    primary = c.replica("n00")
    assert primary is not None
    st = primary.state
    actions = primary.submit(1.0, wire.encode(register("vm1", "n00")))[1]
    assert any(isinstance(a, Send) for a in actions), actions
    assert any(s.pp is not None and s.pp.sender == "n00" for s in st.slots.values())
    st.progress_at = 1.0  # it just executed something
    return primary, 1.0


def _answer(replica: Replica, now: float, last_executed: int) -> list[object]:
    st = replica.state
    status.on_status(st, replica._out, now, "n01", Status(st.view, True, last_executed, 0))
    return [a.message for a in replica._out.flush() if isinstance(a, Send)]


def _has_preprepare(sent: list[object]) -> bool:
    return any(isinstance(wire.decode(env.body), PrePrepare) for env in sent)  # type: ignore[attr-defined]


def test_a_peer_at_our_height_gets_nothing_again_while_we_execute() -> None:
    primary, t = _primary_with_a_batch_in_flight()
    height = primary.state.last_exec
    assert not _has_preprepare(_answer(primary, t + INTERVAL / 2, height))


def test_a_peer_that_stood_still_for_two_reports_gets_our_messages_again() -> None:
    primary, t = _primary_with_a_batch_in_flight()
    height = primary.state.last_exec
    assert not _has_preprepare(_answer(primary, t + 0.1, height))
    # the next report, an interval later, shows the same height; we executed meanwhile
    primary.state.progress_at = t + INTERVAL
    assert _has_preprepare(_answer(primary, t + 0.1 + INTERVAL, height))
    assert primary.metrics["retransmitted"] >= 1


def test_a_replica_that_executed_nothing_for_an_interval_answers_at_once() -> None:
    primary, t = _primary_with_a_batch_in_flight()
    assert _has_preprepare(_answer(primary, t + INTERVAL, primary.state.last_exec))


def test_a_peer_behind_gets_our_status_not_our_batch() -> None:
    primary, t = _primary_with_a_batch_in_flight()
    primary.state.last_exec = 3  # we are ahead of the peer
    sent = _answer(primary, t + INTERVAL, 2)
    assert [type(wire.decode(env.body)) for env in sent] == [Status]  # type: ignore[attr-defined]
