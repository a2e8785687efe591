"""The rounds core (federation.migration.rounds) on its own: the v1 window/ack protocol end
to end over the simulator's page model (acknowledgements lost, late, twice, out of order;
a refused chunk; the ack timeout; chunks that arrive before the incoming images), and
the v3 round control against a scripted data plane (the target's answer, the resume
policy of a cut transfer, the quiet bound)."""

from __future__ import annotations

import pytest

from federation.migration.round_events import (
    CountDirty,
    DirtyCounted,
    MigrationOver,
    PlanRound,
    V3Accept,
    V3Accepted,
    V3Cancel,
    V3ChunkLanded,
    V3Cut,
    V3Drop,
    V3ImageVerified,
    V3Moved,
    V3Prepare,
    V3Prepared,
    V3Preparing,
    V3Resume,
    V3Transfer,
    V3Verified,
)
from federation.migration.round_messages import (
    ACK_TIMEOUT,
    CHUNK_PAGES,
    RESEND_AFTER,
    WINDOW,
    PagesAck,
    PagesChunk,
    V3Preparation,
    V3Round,
    V3Status,
    transfer_id,
)
from federation.migration.round_source import RESUME_BUDGET_S, RESUMES
from federation.migration.round_target import EARLY_CHUNKS
from federation.migration.vocabulary import CancelRound, TransferProgress
from mesh import wire
from mesh.core import PeerUp, Received, TimerFired
from mesh.hde.image import PAGE_SIZE
from sim.hosts.migration_vms import PAGES
from tests.harness.rounds import MID, SRC, TGT, VM, RoundPair

# --------------------------------------------------------------------------- v1


def _chunks(p: RoundPair) -> list[PagesChunk]:
    return [m for _, _, m in p.net if isinstance(m, PagesChunk)]


def test_a_round_sends_every_page_then_the_pages_dirtied_since() -> None:
    p = RoundPair()
    for page in (3, 70, 100):
        p.write(page)
    p.prepare()
    p.send_round(1)
    # contiguous pages: one chunk per CHUNK_PAGES of each image (memory 96, disk 32)
    assert [(c.image, c.page, len(c.data) // PAGE_SIZE) for c in _chunks(p)] == [
        ("disk-0", 0, 32), ("memory", 0, CHUNK_PAGES), ("memory", CHUNK_PAGES, 96 - CHUNK_PAGES)]
    p.write(5)  # after the round's plan: the next round sends it
    p.deliver_all()
    (sent,) = p.sent()
    assert (sent.round, sent.pages, sent.bytes, sent.dirty_pages) == (1, PAGES,
                                                                      PAGES * PAGE_SIZE, 1)
    assert sent.wire_bytes > sent.bytes  # every page as it is, plus framing
    assert p.target_pages()[5] != p.source_pages()[5]
    p.send_round(2)
    (chunk,) = _chunks(p)
    assert (chunk.round, chunk.image, chunk.page, len(chunk.data)) == (2, "memory", 5,
                                                                       PAGE_SIZE)
    p.deliver_all()
    assert p.sent()[-1].pages == 1
    assert p.target_pages() == p.source_pages()
    assert not p.timers[SRC], "a delivered round leaves no timer behind"
    counters = p.cores[SRC].counters
    assert counters.version(1).rounds == 2 and counters.paths[MID] == {"v1": 2}
    assert p.cores[TGT].counters.received[MID] == (PAGES + 1) * PAGE_SIZE
    assert [r.sent for r in p.reports] == p.sent()


def test_the_window_bounds_what_is_in_flight() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    p.deliver_all()
    for page in range(0, PAGES, 2):  # the next round: 64 one-page runs, 4 windows
        p.write(page)
    p.send_round(2)
    going = p.cores[SRC].sending[MID]
    assert len(_chunks(p)) == len(going.unacked) == WINDOW and not going.reading
    p.deliver(0)  # one chunk in, its ack back: one more goes out
    p.deliver(len(p.net) - 1)
    assert len(_chunks(p)) == WINDOW and len(going.unacked) == WINDOW


def test_acks_late_twice_and_out_of_order_end_the_round_once() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    p.deliver_all()
    for page in range(0, PAGES, 2):  # round 2: 64 one-page runs, 64 chunks, 4 windows
        p.write(page)
    p.send_round(2)
    first = len(_chunks(p))
    assert first == WINDOW
    while p.net:
        # chunks reach the target in reverse; every ack comes back twice
        p.deliver(len(p.net) - 1)
        while any(isinstance(m, PagesAck) for _, _, m in p.net):
            i = next(i for i, (_, _, m) in enumerate(p.net) if isinstance(m, PagesAck))
            p.deliver(i, duplicate=True)
            p.deliver(i)
        going = p.cores[SRC].sending.get(MID)
        assert going is None or len(going.reading) + len(going.unacked) <= WINDOW
    assert [s.round for s in p.sent()] == [1, 2]
    assert p.sent()[1].pages == PAGES // 2
    assert p.target_pages() == p.source_pages()
    assert not p.failures()


def test_lost_chunks_are_sent_again_after_the_silence_or_on_a_new_link() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    p.net.clear()  # the link lost the three chunks
    assert p.fire(SRC, "resend")
    assert len(_chunks(p)) == 3
    p.net.clear()  # lost again
    p.feed(SRC, PeerUp(TGT))  # a new link: what the old one carried is sent again at once
    assert len(_chunks(p)) == 3
    p.deliver(0)
    p.net = [(s, d, m) for s, d, m in p.net if not isinstance(m, PagesAck)]  # ack lost
    p.fire(SRC, "resend")  # the first chunk again (its ack was lost), and the others
    p.deliver_all()
    (sent,) = p.sent()
    assert sent.pages == PAGES and p.target_pages() == p.source_pages()
    # what crossed counts every copy sent: each chunk went four times
    assert sent.wire_bytes > 4 * sent.bytes


def test_no_acknowledgement_in_the_ack_timeout_fails_the_round() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    at = p.timers[SRC][("rounds", MID, 1, "ack")]
    assert at == p.now + ACK_TIMEOUT
    assert p.timers[SRC][("rounds", MID, 1, "resend")] == p.now + RESEND_AFTER
    p.fire(SRC, "ack")
    (failed,) = p.failures()
    assert failed.action == "SendRound"
    assert failed.reason == f"no acknowledgement from {TGT} in {ACK_TIMEOUT:.0f} s"
    assert p.cores[SRC].counters.rounds_failed == 1 and p.reports[-1].error == failed.reason
    assert MID not in p.vm[SRC].outgoing, "the failed round's images are closed"
    p.deliver_all()  # the acknowledgements of a failed round change nothing
    assert not p.sent()


def test_a_refused_chunk_fails_the_round_with_the_targets_reason() -> None:
    p = RoundPair()
    p.prepare()
    p.vm[TGT].incoming[MID].pop("disk-0")  # the target cannot write that image
    p.send_round(1)
    p.deliver_all()
    (failed,) = p.failures()
    assert failed.reason == f"{TGT} refused a chunk: no incoming image 'disk-0'"
    assert p.cores[TGT].counters.chunks_refused == 1


def test_chunks_from_another_dc_or_for_no_migration_are_refused() -> None:
    p = RoundPair()
    p.prepare()
    p.feed(TGT, Received("c", PagesChunk(MID, 1, 0, "memory", 0, bytes(PAGE_SIZE))))
    p.feed(TGT, Received(SRC, PagesChunk("other", 1, 0, "memory", 0, bytes(PAGE_SIZE))))
    acks = [m for _, _, m in p.net]
    assert [(a.migration_id, a.error) for a in acks] == [
        (MID, f"no migration {MID!r} from c is running here"),
        ("other", f"no migration 'other' from {SRC} is running here")]
    p.done[TGT] = True  # the target session ended
    p.feed(TGT, Received(SRC, PagesChunk(MID, 1, 0, "memory", 0, bytes(PAGE_SIZE))))
    assert "is running here" in p.net[-1][2].error


def test_chunks_before_the_images_are_held_then_written() -> None:
    p = RoundPair()
    p.send_round(1)
    p.deliver_all()  # the target holds both chunks: its images are not prepared yet
    assert not p.sent() and not p.net
    p.prepare()  # now they are written and acknowledged
    p.deliver_all()
    assert p.sent()[0].pages == PAGES
    assert p.target_pages() == p.source_pages()


def test_held_chunks_are_refused_if_the_images_cannot_be_prepared() -> None:
    p = RoundPair()
    p.send_round(1)
    p.deliver_all()
    p.prepare(error="VM 'vm' runs here; cannot receive it")
    p.deliver_all()
    (failed,) = p.failures()
    assert "the incoming images could not be prepared (VM 'vm' runs here" in failed.reason


def test_more_early_chunks_than_two_windows_are_refused() -> None:
    p = RoundPair()
    for seq in range(EARLY_CHUNKS):
        p.feed(TGT, Received(SRC, PagesChunk(MID, 1, seq, "memory", 0, bytes(PAGE_SIZE))))
    p.feed(TGT, Received(SRC, PagesChunk(MID, 1, 0, "memory", 0, bytes(PAGE_SIZE))))
    assert not p.net, "a chunk held already is held, not refused"
    p.feed(TGT, Received(SRC, PagesChunk(MID, 1, EARLY_CHUNKS, "memory", 0, bytes(PAGE_SIZE))))
    (ack,) = [m for _, _, m in p.net]
    assert ack.seq == EARLY_CHUNKS and "not prepared" in ack.error


def test_a_late_chunk_of_an_earlier_round_is_not_written() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    stale = _chunks(p)[0]
    p.deliver_all()
    p.write(0)
    p.send_round(2)
    p.deliver_all()
    assert p.target_pages()[0] == p.source_pages()[0]
    p.feed(TGT, Received(SRC, stale))  # a duplicate from round 1, arriving now
    assert p.target_pages()[0] == p.source_pages()[0] and not p.net


def test_a_cancelled_round_stops_and_its_late_replies_are_ignored() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    p.feed(SRC, CancelRound(MID))
    assert not p.timers[SRC] and MID not in p.vm[SRC].outgoing
    p.deliver_all()
    assert not p.sent() and not p.failures() and not p.reports
    p.feed(SRC, DirtyCounted(MID, 1, 0))  # a reply that was on its way
    assert not p.sent()


def test_the_session_hears_of_progress_twice_a_second() -> None:
    p = RoundPair()
    p.prepare()
    p.send_round(1)
    p.deliver_all()
    for page in range(0, PAGES, 2):
        p.write(page)
    p.send_round(2)
    for _ in range(200):
        if not p.net:
            break
        p.now += 0.1
        p.deliver(0)
    progress = [e for e in p.to_session[TGT] if isinstance(e, TransferProgress)]
    # 64 chunks over ~7 s of simulated time, one report per PROGRESS_EVERY (0.5 s): an
    # operator's display moves at least once a second
    assert 10 <= len(progress) <= 20, len(progress)
    assert sum(e.bytes for e in progress) <= (PAGES + PAGES // 2) * PAGE_SIZE


def test_the_end_of_a_migration_drops_its_state_on_both_sides() -> None:
    p = RoundPair()
    p.send_round(1)
    p.deliver_all()
    p.feed(SRC, MigrationOver(MID))
    p.feed(TGT, MigrationOver(MID))
    assert not p.cores[SRC].sending and not p.cores[SRC].marks
    assert not p.cores[TGT].receiving.early and MID not in p.cores[TGT].receiving.ready
    assert not p.v3[SRC] and not p.v3[TGT], "no v3 state to drop for a v1 migration"


# --------------------------------------------------------------------------- v3


def _v3_started(p: RoundPair) -> V3Prepare:
    p.send_round(1)
    (prepare,) = p.v3[SRC]
    assert isinstance(prepare, V3Prepare) and (prepare.target, prepare.since) == (TGT, None)
    p.feed(SRC, V3Prepared(MID, 1, mark=7, covered=PAGES, images=("disk-0", "memory")))
    return prepare


def test_v3_round_starts_when_the_target_is_ready_and_ends_counted() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    (_, _, start), = p.net
    assert start == V3Round(MID, 1, transfer_id(MID, 1), ("disk-0", "memory"))
    p.prepare()
    p.deliver_all()  # the target accepts: its data plane is asked to take the round
    (accept,) = p.v3[TGT]
    assert isinstance(accept, V3Accept) and accept.vm == VM and accept.peer == SRC
    p.feed(TGT, V3Accepted(SRC, MID, 1))
    p.deliver_all()  # V3Status: the source's data plane starts the transfer
    assert p.v3[SRC][-1] == V3Transfer(MID, 1)
    p.feed(TGT, V3ChunkLanded(MID, 1, 5000))
    p.feed(TGT, V3ImageVerified(MID, 1, 8 * PAGE_SIZE))
    p.feed(SRC, V3Moved(MID, 1, True, 5000, 3))
    assert p.to_session[SRC][-1] == TransferProgress(1, 3 * 4096, 3, 5000)
    p.feed(SRC, V3Verified(MID, 1, 6000, {"control_bytes": 1000, "level": 3}))
    assert p.cores[SRC].marks[MID] == 7  # the next round's since
    (sent,) = p.sent()
    round_bytes = len(wire.encode(start))
    assert (sent.pages, sent.bytes, sent.wire_bytes) == (PAGES, PAGES * PAGE_SIZE,
                                                         6000 + round_bytes)
    report = p.reports[-1]
    assert report.figures == {"control_bytes": 1000 + round_bytes, "level": 3, "resumes": 0}
    assert p.cores[TGT].counters.received[MID] == 8 * PAGE_SIZE
    assert p.cores[TGT].counters.wire_bytes_received == 5000
    p.feed(SRC, MigrationOver(MID))
    assert p.v3[SRC][-1] == V3Drop(MID)


def test_v3_preparation_is_progress_for_both_sessions() -> None:
    """Round 1's preparation (the shadow's copy, digests and index) moves nothing for a
    while: its reports keep both sides' stall timers quiet, and only from the source."""
    p = RoundPair(version=3)
    p.send_round(1)
    p.feed(SRC, V3Preparing(MID, 1, 4096))
    assert p.to_session[SRC][-1] == TransferProgress(1, 0, 0, 0, 4096)
    (_, dst, msg), = p.net
    assert (dst, msg) == (TGT, V3Preparation(MID, 1, 4096))
    p.deliver_all()
    assert p.to_session[TGT] == [TransferProgress(1, 0, 0, 0, 4096)]
    p.feed(TGT, Received("dc9", V3Preparation(MID, 1, 8192)))  # not the source: nothing
    assert p.to_session[TGT] == [TransferProgress(1, 0, 0, 0, 4096)]
    # round 1 is announced before its copy: the copy's reports (and its dirty sample)
    # are progress while the target gets ready and after its word, not once counted
    p.feed(SRC, V3Prepared(MID, 1, mark=7, covered=PAGES, images=("disk-0", "memory")))
    p.feed(SRC, V3Preparing(MID, 1, 9999, 120, 0.25, 1.5))
    assert p.to_session[SRC][-1] == TransferProgress(1, 0, 0, 0, 9999, 120, 0.25, 1.5)
    p.prepare()
    p.deliver_all()
    p.feed(TGT, V3Accepted(SRC, MID, 1))
    p.deliver_all()
    assert p.v3[SRC][-1] == V3Transfer(MID, 1)
    p.feed(SRC, V3Preparing(MID, 1, 12000))
    assert p.to_session[SRC][-1] == TransferProgress(1, 0, 0, 0, 12000)
    p.feed(SRC, V3Verified(MID, 1, 6000, {}))
    before = len(p.to_session[SRC])
    p.feed(SRC, V3Preparing(MID, 1, 13000))
    assert len(p.to_session[SRC]) == before


def test_v3_target_refusal_and_no_answer_fail_the_round() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    p.net.clear()
    p.feed(SRC, Received(TGT, V3Status(MID, 1, "disk full")))
    (failed,) = p.failures()
    assert failed.reason == f"{TGT} refused round 1: disk full"
    assert p.v3[SRC][-1] == V3Cancel(MID)
    q = RoundPair(version=3)
    _v3_started(q)
    q.fire(SRC, "ready")
    assert q.failures()[0].reason == f"{TGT} did not get ready for round 1 in 30 s"


def test_v3_round_waits_for_the_incoming_images_then_gives_up() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    p.deliver_all()
    assert not p.v3[TGT] and not p.net  # held: the images are not prepared yet
    p.fire(TGT, "prepared")
    (_, _, status), = p.net
    assert status == V3Status(MID, 1, f"the incoming images of {MID!r} are not prepared as "
                                      "['disk-0', 'memory']")


def test_v3_cut_resumes_with_backoff_until_the_budget_ends() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    p.feed(SRC, Received(TGT, V3Status(MID, 1)))
    waits = []
    for _ in range(RESUMES + 2):
        t0 = p.now
        p.feed(SRC, V3Cut(MID, 1, 0, "connection refused"))
        if p.failures():
            break
        assert p.fire(SRC, "resume")
        waits.append(round(p.now - t0, 3))
        assert p.v3[SRC][-1] == V3Resume(MID, 1)
    (failed,) = p.failures()
    assert failed.reason.startswith(f"AMST to {TGT} cut for ")
    assert failed.reason.endswith("resumes): connection refused")
    assert waits[:4] == [0.2, 0.4, 0.8, 1.6]  # AMST's reconnect backoff, doubling
    assert sum(waits) <= RESUME_BUDGET_S + 1e-9


def test_v3_chunks_getting_through_start_a_new_cut() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    p.feed(SRC, Received(TGT, V3Status(MID, 1)))
    for _ in range(3 * RESUMES):  # every transfer moved some chunks before it was cut
        p.feed(SRC, V3Cut(MID, 1, 1 << 20, "reset"))
        assert p.fire(SRC, "resume")
        p.now += 1.0
    assert not p.failures()
    p.feed(SRC, V3Verified(MID, 1, 100, {}))
    assert p.reports[-1].figures["resumes"] == 3 * RESUMES


def test_v3_nothing_moving_for_the_quiet_bound_fails_the_round() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    p.feed(SRC, Received(TGT, V3Status(MID, 1)))
    p.feed(SRC, V3Moved(MID, 1, False, 0))  # a report that nothing moved renews nothing
    assert p.fire(SRC, "quiet")
    assert p.failures()[0].reason == f"round 1: no progress with {TGT} in 30 s"


def test_v3_status_from_another_dc_or_round_is_ignored() -> None:
    p = RoundPair(version=3)
    _v3_started(p)
    p.feed(SRC, Received("c", V3Status(MID, 1, "forged")))
    p.feed(SRC, Received(TGT, V3Status(MID, 2, "stale")))
    assert not p.failures()


@pytest.mark.parametrize("event", [
    PlanRound(MID, VM, 1, None), CountDirty(MID, VM, 1, 0), TimerFired("not ours"),
])
def test_the_core_refuses_what_is_not_its_input(event: object) -> None:
    p = RoundPair()
    if isinstance(event, TimerFired):
        assert p.cores[SRC].handle(0.0, event) == []
        return
    with pytest.raises(TypeError, match="takes no"):
        p.cores[SRC].handle(0.0, event)


def test_an_unknown_version_fails_at_once() -> None:
    p = RoundPair(version=2)
    p.send_round(1)
    assert p.failures()[0].reason == "this DC carries no transfer version 2"
    assert not p.sent() and not p.cores[SRC].sending
