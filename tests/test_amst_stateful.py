"""AMST under random faults: hypothesis drives a sender and a receiver core through
stream cuts, lost frames (a stalled stream), duplicates and corruptions, then lets
the transfer finish (resuming with a fresh sender if it was cut) and checks that
every chunk arrived exactly once, intact, and no acknowledged chunk was re-sent."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mesh.amst.receiver import Chunk
from mesh.amst.sender import STALL_S
from tests.harness.amst import Pair

TOTAL = 24


class Transfer(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(TOTAL)
        self.resumes = 0

    def live(self) -> list[int]:
        return self.pair.live()

    @precondition(lambda self: self.pair.aborted is None)
    @rule()
    def offer(self) -> None:
        self.pair.offer()

    @precondition(lambda self: self.pair.opening)
    @rule(data=st.data(), fail=st.booleans())
    def connect(self, data: st.DataObject, fail: bool) -> None:
        s = data.draw(st.sampled_from(self.pair.opening))
        if fail and self.pair.aborted is None:
            self.pair.fail_connect(s)
        else:
            self.pair.connect(s)

    @precondition(lambda self: any(self.pair.to_recv[s] for s in self.pair.live()))
    @rule(data=st.data())
    def frame_to_receiver(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from([s for s in self.live() if self.pair.to_recv[s]]))
        self.pair.to_receiver(s)

    @precondition(lambda self: any(self.pair.to_send[s] for s in self.pair.live()))
    @rule(data=st.data())
    def ack_to_sender(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from([s for s in self.live() if self.pair.to_send[s]]))
        self.pair.to_sender(s)

    @precondition(lambda self: self.pair.writing)
    @rule(data=st.data())
    def write_completes(self, data: st.DataObject) -> None:
        self.pair.complete_write(data.draw(st.sampled_from(sorted(self.pair.writing))))

    @precondition(lambda self: self.pair.live() and self.pair.aborted is None)
    @rule(data=st.data())
    def cut(self, data: st.DataObject) -> None:
        self.pair.drop_stream(data.draw(st.sampled_from(self.live())))

    @precondition(lambda self: any(self.pair.to_recv[s] for s in self.pair.live()))
    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from([s for s in self.live() if self.pair.to_recv[s]]))
        self.pair.corrupt_next(s)

    @precondition(lambda self: any(self.pair.to_recv[s] for s in self.pair.live()))
    @rule(data=st.data())
    def lose_frame_then_stall(self, data: st.DataObject) -> None:
        """A frame vanishes; TCP would never deliver past it, so the stream stalls until the
        sender's stall timer gives up on it."""
        s = data.draw(st.sampled_from([s for s in self.live() if self.pair.to_recv[s]]))
        self.pair.to_recv[s].popleft()
        self.pair.to_send[s].clear()
        self.pair.to_recv[s].clear()
        self.pair.now += STALL_S + 1.0
        self.pair.fire_due_timers()
        if s in self.pair.to_recv and self.pair.aborted is None:
            self.pair.drop_stream(s)  # the stream had nothing outstanding: a plain cut

    @precondition(lambda self: self.pair.sent_frames and self.pair.live())
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        """A stale copy of an earlier chunk frame shows up on some stream."""
        old: Chunk = data.draw(st.sampled_from(self.pair.sent_frames))
        self.pair.to_recv[data.draw(st.sampled_from(self.live()))].append((old, True))

    @rule(seconds=st.floats(0.1, 2.0))
    def time_passes(self, seconds: float) -> None:
        self.pair.now += seconds
        self.pair.fire_due_timers()

    @invariant()
    def window_never_exceeded(self) -> None:
        sender = self.pair.sender
        assert sender.in_flight <= sender.window
        assert sender.max_in_flight <= sender.window

    def teardown(self) -> None:
        pair = self.pair
        pair.run_quietly()
        while pair.aborted is not None:  # the transfer was cut: resume it
            self.resumes += 1
            assert self.resumes < 5, "resuming did not make progress"
            before = set(pair.receiver.received.spans()) | {pair.receiver.received.floor}
            pair.new_sender()
            pair.run_quietly()
            assert before  # resumed sender learnt the receiver's state from its first Ack
        assert pair.finished == TOTAL
        assert sorted(pair.delivered) == list(range(TOTAL))
        assert pair.receiver.complete


TestTransfer = Transfer.TestCase
