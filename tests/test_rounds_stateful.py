"""The v1 window/ack protocol of the rounds core under random interleavings: hypothesis
delivers the link's messages in any order, duplicates and drops them, fires the resend
timer, brings the link up again, prepares the incoming images late and has the guest
write between rounds. Invariants after every step: never more than WINDOW chunks in
flight, no round failed (nothing was refused and the ack timeout never fired), rounds
end once each and in order. At the end the link heals and a final round runs with the
guest stopped: the target then holds exactly the source's pages."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from federation.migration.round_messages import WINDOW
from mesh.core import PeerUp
from sim.hosts.migration_vms import PAGES
from tests.harness.rounds import MID, SRC, TGT, RoundPair

#: Pre-copy rounds before the final one (the mode limits are 5 to 10).
ROUNDS = 4


class LossyRounds(RuleBasedStateMachine):
    p: RoundPair

    @initialize(prepared=st.booleans())
    def start(self, prepared: bool) -> None:
        self.p = RoundPair()
        self.prepared = prepared
        if prepared:
            self.p.prepare()
        self.round = 1
        self.p.send_round(1)

    def _running(self) -> bool:
        return MID in self.p.cores[SRC].sending

    @precondition(lambda self: bool(self.p.net))
    @rule(i=st.integers(0, 63))
    def deliver(self, i: int) -> None:
        self.p.deliver(i % len(self.p.net))

    @precondition(lambda self: bool(self.p.net))
    @rule(i=st.integers(0, 63))
    def duplicate(self, i: int) -> None:
        self.p.deliver(i % len(self.p.net), duplicate=True)

    @precondition(lambda self: bool(self.p.net))
    @rule(i=st.integers(0, 63))
    def drop(self, i: int) -> None:
        self.p.net.pop(i % len(self.p.net))

    @rule()
    def resend_after_silence(self) -> None:
        self.p.fire(SRC, "resend")

    @rule()
    def new_link(self) -> None:
        self.p.feed(SRC, PeerUp(TGT))

    @precondition(lambda self: not self.prepared)
    @rule()
    def prepare(self) -> None:
        self.prepared = True
        self.p.prepare()

    @rule(page=st.integers(0, PAGES - 1))
    def guest_writes(self, page: int) -> None:
        self.p.write(page)

    @precondition(lambda self: self.round < ROUNDS and len(self.p.sent()) == self.round)
    @rule()
    def next_round(self) -> None:
        self.round += 1
        self.p.send_round(self.round)

    @invariant()
    def window_bounds_what_is_in_flight(self) -> None:
        going = self.p.cores[SRC].sending.get(MID)
        if going is not None:
            assert len(going.reading) + len(going.unacked) <= WINDOW  # type: ignore[attr-defined]

    @invariant()
    def rounds_end_once_in_order_and_never_fail(self) -> None:
        assert not self.p.failures(), self.p.failures()
        assert [s.round for s in self.p.sent()] == list(range(1, len(self.p.sent()) + 1))

    def teardown(self) -> None:
        p = self.p
        if not self.prepared:
            p.prepare()
        for _ in range(50):  # the link heals: whatever is lost is sent again
            while p.net:  # newest first: a late copy of an old chunk comes in last
                p.deliver(len(p.net) - 1)
            if not self._running():
                break
            p.fire(SRC, "resend")
        assert not self._running() and len(p.sent()) == self.round
        p.send_round(self.round + 1, final=True)  # the guest is stopped: nothing changes
        p.deliver_all()
        assert len(p.sent()) == self.round + 1
        assert p.target_pages() == p.source_pages()


TestLossyRounds = LossyRounds.TestCase
