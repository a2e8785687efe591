"""AMST cores: chunk sets, the receiver, the sender's scheduling, window, re-sends,
resume, stream-count adaptation, and fuzzing of the AMST wire messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.amst import receiver as amst
from mesh.amst.policy import (
    STREAM_BOUNDS,
    StreamController,
    chunk_bytes_for_loss,
    streams_for_bdp,
)
from mesh.amst.receiver import (
    Ack,
    AckArrived,
    AmstError,
    AmstReceiver,
    Chunk,
    ChunkArrived,
    ChunkSet,
    Deliver,
    End,
    EndArrived,
    Open,
    Reply,
    Span,
    StreamDown,
    StreamUp,
    check_ack,
    chunk_digest,
)
from mesh.amst.sender import (
    STALL_S,
    AmstSender,
    ChunkOffered,
    ChunkWritten,
    CloseStream,
    Finish,
    LinkObserved,
    OpenStream,
    Release,
    SourceDone,
    Transmit,
)
from mesh.core import TimerFired
from mesh.links.modes import Mode
from tests.harness.amst import TRANSFER, Pair, payload_of

MiB = 1024 * 1024


def chunk_msg(c: int, payload: bytes | None = None) -> Chunk:
    p = payload_of(c) if payload is None else payload
    return Chunk(c, chunk_digest(payload_of(c)), p)


def of(kind: type, actions: list) -> list:
    return [a for a in actions if isinstance(a, kind)]


# --------------------------------------------------------------------------- ChunkSet


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=40))
def test_chunkset_matches_a_plain_set(spans: list[tuple[int, int]]) -> None:
    cs, plain = ChunkSet(), set()
    for start, length in spans:
        cs.add_span(start, start + length)
        plain.update(range(start, start + length))
        floor = 0
        while floor in plain:
            floor += 1
        assert cs.floor == floor
        assert cs.count() == len(plain)
        assert all((i in cs) == (i in plain) for i in range(230))
        prev = cs.floor
        for span in cs.spans():
            assert prev < span.start < span.end
            prev = span.end


# --------------------------------------------------------------------------- receiver


def test_receiver_delivers_once_refuses_corrupt_and_completes() -> None:
    r = AmstReceiver(TRANSFER)
    assert of(Reply, r.handle(0, StreamUp(0)))[0].message == Ack(0, (), ())
    out = r.handle(0, ChunkArrived(0, chunk_msg(1), True))
    assert of(Deliver, out) == [Deliver(1, payload_of(1))]
    assert of(Reply, out)[0].message == Ack(0, (Span(1, 2),), ())
    out = r.handle(0, ChunkArrived(0, chunk_msg(0, b"evil"), False))
    assert not of(Deliver, out) and r.refused == 1
    assert of(Reply, out)[0].message == Ack(0, (Span(1, 2),), (0,))
    out = r.handle(0, ChunkArrived(1, chunk_msg(0), True))
    assert of(Deliver, out) == [Deliver(0, payload_of(0))]
    assert of(Reply, out)[0].message == Ack(2, (), ())
    out = r.handle(0, ChunkArrived(1, chunk_msg(1), True))  # a duplicate
    assert not of(Deliver, out) and r.duplicates == 1
    r.handle(0, EndArrived(1, End(2)))
    assert r.complete
    with pytest.raises(AmstError, match="beyond the end"):
        r.handle(0, ChunkArrived(1, chunk_msg(5), True))


def test_receiver_refuses_an_end_that_claims_missing_chunks() -> None:
    r = AmstReceiver(TRANSFER)
    r.handle(0, ChunkArrived(0, chunk_msg(0), True))
    with pytest.raises(AmstError, match="End\\(3\\)"):
        r.handle(0, EndArrived(0, End(3)))


# --------------------------------------------------------------------------- sender


def synced_sender(**kwargs) -> tuple[AmstSender, list[int]]:
    s = AmstSender(TRANSFER, **kwargs)
    opened = [a.stream for a in of(OpenStream, s.start(0.0))]
    for st_ in opened:
        s.handle(0.0, StreamUp(st_))
        s.handle(0.0, AckArrived(st_, Ack(0, (), ())))
    return s, opened


def test_sender_starts_with_the_mode_bounds() -> None:
    for mode, bounds in STREAM_BOUNDS.items():
        s = AmstSender(TRANSFER, mode=mode)
        assert len(of(OpenStream, s.start(0.0))) == bounds.initial
        assert AmstSender(TRANSFER, mode=Mode(mode)).bounds == bounds
    with pytest.raises(ValueError, match="mode must be one of"):
        AmstSender(TRANSFER, mode="lan")


def test_sender_admits_nothing_before_the_receiver_answers() -> None:
    s = AmstSender(TRANSFER)
    s.start(0.0)
    assert s.room() == 0


def test_window_bounds_admission() -> None:
    s, _ = synced_sender(window_bytes=4 * MiB)
    for c in range(4):
        s.handle(0.0, ChunkOffered(c, MiB))
    assert s.room() == 0 and s.in_flight == 4 * MiB
    with pytest.raises(AmstError, match="does not fit the window"):
        s.handle(0.0, ChunkOffered(4, 1))


def test_chunks_spread_over_streams_one_at_a_time() -> None:
    s, streams = synced_sender()
    out = []
    for c in range(5):
        out += s.handle(0.0, ChunkOffered(c, MiB))
    assert [(t.stream, t.chunk) for t in of(Transmit, out)] == [(0, 0), (1, 1)]
    out = s.handle(0.1, ChunkWritten(1, 1))
    assert of(Transmit, out) == [Transmit(1, 2)]


def test_broken_stream_chunks_go_to_the_others_and_acked_ones_never_resend() -> None:
    s, _ = synced_sender()
    out = []
    for c in range(4):
        out += s.handle(0.0, ChunkOffered(c, MiB))
    out += s.handle(0.1, ChunkWritten(0, 0))
    out += s.handle(0.1, ChunkWritten(1, 1))
    sent = [(t.stream, t.chunk) for t in of(Transmit, out)]
    assert sent == [(0, 0), (1, 1), (0, 2), (1, 3)]
    out = s.handle(0.2, AckArrived(0, Ack(1, (), ())))  # chunk 0 acknowledged on stream 0
    assert of(Release, out) == [Release(0)]
    out = s.handle(0.3, StreamDown(0))  # chunk 2 (being written) is lost with stream 0
    assert s.resent == 1 and not of(Transmit, out)  # stream 1 is busy writing 3
    assert of(OpenStream, out) == [OpenStream(2)]  # a replacement stream is opened
    out = s.handle(0.4, ChunkWritten(1, 3))
    assert of(Transmit, out) == [Transmit(1, 2)]  # re-sent on the survivor
    s.handle(0.5, ChunkWritten(1, 2))
    out = s.handle(0.6, AckArrived(1, Ack(4, (), ())))
    assert sorted(r.chunk for r in of(Release, out)) == [1, 2, 3]
    assert s.sends == {0: 1, 1: 1, 2: 2, 3: 1}


def test_refused_chunk_is_resent_first_and_persistent_refusal_aborts() -> None:
    s, _ = synced_sender()
    s.handle(0.0, ChunkOffered(0, MiB))
    s.handle(0.0, ChunkOffered(1, MiB))
    s.handle(0.1, ChunkWritten(0, 0))
    out = s.handle(0.2, AckArrived(0, Ack(0, (), (0,))))
    assert of(Transmit, out) == [Transmit(0, 0)] and s.refused == 1
    for _ in range(10):
        s.handle(0.3, ChunkWritten(0, 0))
        out = s.handle(0.3, AckArrived(0, Ack(0, (), (0,))))
        if s.done:
            break
    assert s.done and "refused" in repr(out)


def test_acks_that_lie_are_refused_by_name() -> None:
    s, _ = synced_sender()
    with pytest.raises(AmstError, match="stream 0: ack spans"):
        s.handle(0.0, AckArrived(0, Ack(5, (Span(3, 9),), ())))


def test_resume_skips_acknowledged_chunks() -> None:
    s = AmstSender(TRANSFER)
    s.start(0.0)
    s.handle(0.0, StreamUp(0))
    s.handle(0.0, AckArrived(0, Ack(3, (Span(5, 6),), ())))  # receiver already holds 0-2, 5
    s.handle(0.0, StreamUp(1))
    for c in (0, 1, 2, 5):
        assert s.handle(0.0, ChunkOffered(c, MiB)) == [Release(c)]
    out = s.handle(0.0, ChunkOffered(3, MiB)) + s.handle(0.0, ChunkOffered(4, MiB))
    assert sorted(t.chunk for t in of(Transmit, out)) == [3, 4]
    s.handle(0.0, SourceDone())
    out = s.handle(0.5, AckArrived(0, Ack(6, (), ())))
    assert of(Finish, out) == [Finish(6)] and s.done


def test_stalled_stream_is_closed_and_its_chunks_resent() -> None:
    s, _ = synced_sender()
    s.handle(0.0, ChunkOffered(0, MiB))
    s.handle(0.0, ChunkWritten(0, 0))
    out = s.handle(STALL_S + 1, TimerFired(("amst", "adapt")))
    assert CloseStream(0) in out and s.resent == 1
    assert Transmit(1, 0) in out


def test_link_estimate_sets_chunk_size_and_streams() -> None:
    s, _ = synced_sender(mode="internet")
    out = s.handle(0.0, LinkObserved(rtt=0.2, bandwidth=125e6, loss=0.02))  # BDP 25 MB
    assert s.chunk_bytes == chunk_bytes_for_loss(0.02) < MiB
    assert s.controller.target == streams_for_bdp(25e6, STREAM_BOUNDS["internet"]) == 8
    s2, _ = synced_sender(mode="hybrid")
    out = s2.handle(0.0, LinkObserved(rtt=0.04, bandwidth=250e6, loss=0.0))  # BDP 10 MB
    assert s2.controller.target == 4 and not of(OpenStream, out)
    assert chunk_bytes_for_loss(0.0) > chunk_bytes_for_loss(0.005) > chunk_bytes_for_loss(0.05)


def test_controller_keeps_streams_that_pay_and_drops_those_that_do_not() -> None:
    c = StreamController(STREAM_BOUNDS["hybrid"], 4)
    assert c.observe(100.0) == 5  # probe
    assert c.observe(130.0) == 6  # it paid: probe further
    assert c.observe(131.0) == 5  # it did not: back to 5, hold
    for _ in range(StreamController.HOLD_INTERVALS):
        assert c.observe(131.0) == 5
    assert c.observe(131.0) == 6  # probe again after the hold
    top = StreamController(STREAM_BOUNDS["datacenter"], 4)
    assert top.observe(1.0) == 4  # at the maximum: nothing to probe


def test_harness_transfer_finishes_without_faults() -> None:
    pair = Pair(40)
    pair.run_quietly()
    assert pair.finished == 40 and sorted(pair.delivered) == list(range(40))
    assert all(n == 1 for n in pair.sender.sends.values())


# --------------------------------------------------------------------------- wire fuzz

AMST_TYPES = (Open, Chunk, Ack, End)


@given(st.binary(max_size=300))
def test_decoder_refuses_garbage_with_wire_error_only(data: bytes) -> None:
    try:
        msg = wire.decode(data, expect=AMST_TYPES)
    except wire.WireError:
        return
    assert wire.encode(msg) == data


spans = st.lists(st.builds(Span, st.integers(0, 2**63), st.integers(0, 2**63)), max_size=6)


@given(
    st.one_of(
        st.builds(Open, st.binary(min_size=16, max_size=16), st.integers(0, 1024)),
        st.builds(
            Chunk,
            st.integers(0, 2**63 - 1),
            st.binary(min_size=32, max_size=32),
            st.binary(max_size=64),
        ),
        st.builds(
            Ack, st.integers(0, 2**63), spans, st.lists(st.integers(0, 2**63 - 1), max_size=16)
        ),
        st.builds(End, st.integers(0, 2**63)),
    ),
    st.data(),
)
def test_messages_round_trip_and_mutations_fail_cleanly(msg, data: st.DataObject) -> None:
    raw = wire.encode(msg)
    assert wire.decode(raw, expect=AMST_TYPES) == msg
    i = data.draw(st.integers(0, len(raw) - 1))
    mutated = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1 :]
    try:
        decoded = wire.decode(mutated, expect=AMST_TYPES)
    except wire.WireError:
        return
    if isinstance(decoded, Ack):
        try:
            check_ack(decoded, "peer")
        except AmstError as exc:
            assert "peer" in str(exc)


@given(st.integers(0, 50), spans, st.lists(st.integers(0, 60), max_size=4))
def test_sender_takes_any_ack_or_names_the_fault(cum: int, sp, refused) -> None:
    s, _ = synced_sender()
    for c in range(8):
        s.handle(0.0, ChunkOffered(c, MiB))
    try:
        s.handle(0.1, AckArrived(0, Ack(cum, tuple(sp), tuple(refused))))
    except AmstError as exc:
        assert "stream 0" in str(exc)
    assert 0 <= s.in_flight <= s.window


def test_measured_bandwidth_delay_product_raises_the_stream_count() -> None:
    s, _ = synced_sender(mode="hybrid")  # starts with 4 streams, at most 8
    s.handle(0.5, TimerFired(("amst", "adapt")))  # the opening interval is not judged
    offered, written = 0, []
    for step in range(1, 11):  # every 0.1 s each stream writes 3 chunks, acked 0.2 s later
        now = 0.5 + 0.1 * step
        while s.room() >= MiB:
            s.handle(now, ChunkOffered(offered, MiB))
            offered += 1
        for st_ in s.up_streams():
            for _ in range(3):
                c = s._streams[st_].writing
                assert c is not None
                s.handle(now, ChunkWritten(st_, c))
                written.append((now, c))
        due = ChunkSet()  # exactly the chunks written 0.2 s ago or earlier
        for t, c in written:
            if t <= now - 0.2 + 1e-9:
                due.add(c)
        s.handle(now, AckArrived(0, Ack(due.floor, due.spans(), ())))
    s.handle(1.5, TimerFired(("amst", "adapt")))
    # ~100 MB/s acknowledged at a 0.2 s RTT: a 20 MB product needs 7 windows of 3 MiB,
    # more than the hill climb's one probe (4 -> 5) would give
    assert s.controller.target >= 7


def test_receiver_refuses_a_peer_that_scatters_chunk_ids(monkeypatch) -> None:
    monkeypatch.setattr(amst, "MAX_HOLES", 50)
    r = AmstReceiver(TRANSFER)
    for i in range(1, 51):
        r.handle(0, ChunkArrived(0, Chunk(2 * i, bytes(32), b""), True))
    with pytest.raises(AmstError, match="gaps"):
        r.handle(0, ChunkArrived(0, Chunk(1000, bytes(32), b""), True))
    assert 1000 not in r.received and r.delivered == 50  # refused before anything changed
    r.handle(0, ChunkArrived(0, Chunk(3, bytes(32), b""), True))  # filling a gap is fine
    r.handle(0, ChunkArrived(0, Chunk(103, bytes(32), b""), True))  # so is growing a span
    assert r.delivered == 52
