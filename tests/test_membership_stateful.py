"""A small SWIM cluster driven by hypothesis: messages are delivered, dropped, duplicated
and reordered, timers fire in any order the clock allows. Invariants hold after every
step; once the network is healed and time runs, every member sees every other alive."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mesh import wire
from mesh.core import CancelTimer, Received, Send, SetTimer, TimerFired
from mesh.gossip.membership import Membership, State
from tests.harness.gossip import statements_for

NAMES = ["a", "b", "c", "d"]


class Cluster(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.nodes = {n: Membership(n, [p for p in NAMES if p != n], random.Random(i),
                                    statements=statements_for(n, NAMES))
                      for i, n in enumerate(NAMES)}
        self.timers: dict[str, dict] = {n: {} for n in NAMES}
        self.inflight: list[tuple[str, str, bytes]] = []
        self.seen_inc: dict[tuple[str, str], int] = {}
        for n, m in self.nodes.items():
            self._do(n, m.start(self.now))

    def _do(self, node: str, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.inflight.append((node, a.peer, wire.encode(a.message)))
            elif isinstance(a, SetTimer):
                self.timers[node][a.key] = a.at
            elif isinstance(a, CancelTimer):
                self.timers[node].pop(a.key, None)

    def _deliver(self, index: int) -> None:
        src, dst, raw = self.inflight.pop(index)
        msg = wire.decode(raw)
        self._do(dst, self.nodes[dst].handle(self.now, Received(src, msg, raw)))

    def _fire_next(self) -> None:
        node, key, at = min(((n, k, t) for n, ts in self.timers.items() for k, t in ts.items()),
                            key=lambda x: (x[2], x[0], repr(x[1])))
        self.now = max(self.now, at)
        del self.timers[node][key]
        self._do(node, self.nodes[node].handle(self.now, TimerFired(key)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        self._deliver(data.draw(st.integers(0, len(self.inflight) - 1)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.inflight.append(self.inflight[data.draw(st.integers(0, len(self.inflight) - 1))])

    @rule(steps=st.integers(1, 8))
    def fire_timers(self, steps: int) -> None:
        for _ in range(steps):
            self._fire_next()

    @invariant()
    def incarnations_only_grow_and_nobody_buries_itself(self) -> None:
        for n, m in self.nodes.items():
            assert m.state_of(n) == State.ALIVE
            for member in m.members.values():
                key = (n, member.name)
                assert member.incarnation >= self.seen_inc.get(key, 0)
                self.seen_inc[key] = member.incarnation
                # nobody holds an incarnation its owner never reached
                assert member.incarnation <= self.nodes[member.name].incarnation

    def teardown(self) -> None:
        # Heal: deliver everything promptly while time runs for 60 s.
        end = self.now + 60.0
        while self.now < end:
            while self.inflight:
                self._deliver(0)
            self._fire_next()
        for n, m in self.nodes.items():
            states = {p: m.state_of(p) for p in m.members}
            assert all(s == State.ALIVE for s in states.values()), (n, states)


Cluster.TestCase.settings = settings(
    max_examples=max(1, settings().max_examples // 10), stateful_step_count=40, deadline=None)
TestCluster = Cluster.TestCase
