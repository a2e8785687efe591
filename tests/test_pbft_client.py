"""The ledger client's retransmission timeout (RFC 6298 over commit latency) and the
replica's relay of waiting requests."""

from __future__ import annotations

import random
from collections.abc import Sequence

from consensus.pbft.client import RETRANSMIT, RETRANSMIT_MAX, LedgerClient
from consensus.pbft.durable import ReplicaLog
from consensus.pbft.messages import Envelope, Reply, Request, Result
from consensus.pbft.quorum import Quorum
from consensus.pbft.replica import Replica
from consensus.pbft.state import STATUS_TIMER
from mesh import wire
from mesh.core import Send, SetTimer, TimerFired
from sim.hosts.pbft_cluster import identity_for
from tests.harness.ledger import register

NAMES = ["n00", "n01", "n02", "n03"]


class _Store:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)


def client() -> LedgerClient:
    q = Quorum.of({m: identity_for(m).public for m in NAMES})
    return LedgerClient("n01", identity_for("n01"), q, 300.0, _Store())  # type: ignore[arg-type]


def commit(c: LedgerClient, rid: int, at: float) -> None:
    for peer in ("n00", "n02"):  # f + 1 = 2 matching replies
        c.on_reply(at, peer, Reply(0, "n01", (Result(rid, b"ok"),)))
    assert rid not in c.outstanding


def timer_at(actions: Sequence[object]) -> float:
    [t] = [a for a in actions if isinstance(a, SetTimer)]
    return t.at


def test_first_requests_retransmit_after_the_floor() -> None:
    c = client()
    _rids, _req, _env, actions = c.submit(10.0, (b"cmd",))
    assert timer_at(actions) == 10.0 + RETRANSMIT


def test_slow_commits_stretch_the_timeout_and_fast_ones_shrink_it_to_the_floor() -> None:
    c = client()
    now = 0.0
    for _ in range(20):  # a loaded federation: 1.5 s per command, +-0.5 s
        rids, _req, _env, _ = c.submit(now, (b"cmd",))
        rid = rids.start
        commit(c, rid, now + 1.5 + (0.5 if rid % 2 else -0.5))
        now += 3.0
    slow = c.retransmit_timeout()
    assert RETRANSMIT < slow <= RETRANSMIT_MAX
    _rids, _req, _env, actions = c.submit(now, (b"cmd",))
    assert timer_at(actions) == now + slow
    for _ in range(60):  # quiet again: 5 ms per command
        rids, _req, _env, _ = c.submit(now, (b"cmd",))
        rid = rids.start
        commit(c, rid, now + 0.005)
        now += 1.0
    assert c.retransmit_timeout() == RETRANSMIT


def test_timeout_is_capped_and_retransmitted_requests_are_no_sample() -> None:
    c = client()
    rids, _req, _env, _ = c.submit(0.0, (b"cmd",))
    rid = rids.start
    commit(c, rid, 100.0)
    assert c.retransmit_timeout() == RETRANSMIT_MAX
    srtt = c.srtt
    rids, _req, _env, _ = c.submit(200.0, (b"cmd",))
    rid = rids.start
    actions = c.on_timer(200.0 + RETRANSMIT_MAX, ("ledger-client", rid), NAMES)
    assert [e.body for e in c.take_resend()] == [c.outstanding[rid].envelope.body]
    assert timer_at(actions) == 200.0 + 2 * RETRANSMIT_MAX
    commit(c, rid, 200.0 + RETRANSMIT_MAX + 0.01)  # ambiguous: which copy was answered?
    assert c.srtt == srtt


def _replica(name: str) -> Replica:
    keys = {m: identity_for(m).public for m in NAMES}
    store = _MemStore()
    return Replica(name, identity_for(name), keys, ReplicaLog(store), random.Random(0))  # type: ignore[arg-type]


class _MemStore(_Store):
    def put(self, key: str, value: bytes, sync: bool = True) -> None:
        self.data[key] = value

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


def _requests_sent(actions: Sequence[object]) -> list[str]:
    """The peers sent a REQUEST (the primary may get it twice: forwarded by a backup
    and relayed by its client)."""
    out: set[str] = set()
    for a in actions:
        if isinstance(a, Send) and isinstance(a.message, Envelope):
            if wire.peek_tag(a.message.body) == Request.wire_tag:  # type: ignore[attr-defined]
                out.add(a.peer)
    return sorted(out)


def test_waiting_requests_are_relayed_to_all_only_while_execution_stands_still() -> None:
    r = _replica("n01")
    r.start(0.0)
    _rid, actions = r.submit(0.1, wire.encode(register("vm-1", "n01")))
    assert _requests_sent(actions) == ["n00"]  # to the primary only (OSDI'99 §4.1)
    half = r.state.timeout / 2
    r.state.progress_at = 0.2 + half  # a batch executed just now: the request is queued
    assert _requests_sent(r.handle(0.3 + half, TimerFired(STATUS_TIMER))) == []
    # nothing executed for half a view timeout: every replica gets it, once
    at = r.state.progress_at + half + 0.01
    assert _requests_sent(r.handle(at, TimerFired(STATUS_TIMER))) == ["n00", "n02", "n03"]
    assert _requests_sent(r.handle(at + 1.0, TimerFired(STATUS_TIMER))) == []
