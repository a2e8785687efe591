"""The link prober driven by hypothesis: pings from a peer arrive late, lost, duplicated
or from a restarted sender, silence is judged at any time, transfers report bandwidth.
After every step the published estimates stay sane and their versions only grow."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mesh.gossip.control_msgs import LinkPing
from mesh.links.estimates import LinkConfig, LinkProber, LinkTable
from tests.harness.gossip import statements_for

CFG = LinkConfig()


class Prober(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        table = LinkTable("a", ["a", "b"], statements_for("a", "ab"))
        self.p = LinkProber("a", ["b"], random.Random(5), table)
        self.p.start(0.0)
        self.session = 1
        self.seq = 0
        self.versions: list[int] = []
        self.last_arrival = 0.0

    def _collect(self) -> None:
        self.versions += [e.version for e, _ in self.p.published]
        self.p.published = []

    @rule(gap=st.floats(0.0, 3 * CFG.ping_interval), skip=st.integers(0, 4))
    def ping_arrives(self, gap: float, skip: int) -> None:
        self.now += gap
        self.seq += 1 + skip
        self.p.received_ping(self.now, "b", LinkPing(self.session, self.seq, self.now - 0.05,
                                                     None, 0.0))
        self.last_arrival = self.now
        self._collect()

    @rule()
    def duplicate(self) -> None:
        if self.seq:
            assert self.p.received_ping(self.now, "b", LinkPing(
                self.session, self.seq, self.now - 0.05, None, 0.0)) == []

    @rule()
    def sender_restarts(self) -> None:
        self.session += 1
        self.seq = 0

    @rule(gap=st.floats(0.0, 10 * CFG.ping_interval))
    def silence_is_judged(self, gap: float) -> None:
        self.now += gap
        self.p.check(self.now)
        self._collect()
        overdue = (self.now - self.p.peers["b"].last_rx) / CFG.ping_interval - CFG.grace_fraction
        if overdue >= CFG.down_misses:
            assert self.p.peers["b"].down

    @rule(mbytes=st.integers(1, 10_000), seconds=st.floats(0.01, 100.0))
    def transfer(self, mbytes: int, seconds: float) -> None:
        self.p.record_transfer(self.now, "b", mbytes * 1_000_000, seconds)
        self._collect()

    @invariant()
    def estimates_are_sane(self) -> None:
        loss, overdue = self.p.loss(self.p.peers["b"], self.now)
        assert 0.0 <= loss <= 1.0 and overdue >= 0
        assert self.versions == sorted(set(self.versions))
        own = self.p.table.entries.get(("a", "b"))
        if self.versions:
            assert own is not None and own.version == self.versions[-1]
            assert 0.0 <= own.loss <= 1.0 and (not own.down or own.loss == 1.0)
            if own.bw_mbps is not None:
                assert own.bw_mbps > 0


Prober.TestCase.settings = settings(
    max_examples=max(1, settings().max_examples // 4), stateful_step_count=40, deadline=None)
TestProber = Prober.TestCase
