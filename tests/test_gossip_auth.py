"""Gossip speaks only for its origin (issue 15, item 4): signed statements, who may say
what, counters that cannot be pushed to the top, per-peer budgets, and an insider who
forges for others in the simulator."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import wire
from mesh.core import Received, Send
from mesh.gossip.control_msgs import (
    STATEMENT_MAX,
    Gossip,
    LinkEntry,
    MemberUpdate,
    Signed,
    Sync,
)
from mesh.gossip.membership import SYNC_REPLY_BURST, Membership, State
from mesh.gossip.statements import (
    ACCUSATION_STEP,
    CACHE_MAX,
    COUNTER_MAX,
    SELF_STEP,
    TokenBucket,
)
from mesh.gossip.transmit_queue import TransmitQueue
from mesh.links.control_plane import statement_cache_size
from mesh.links.estimates import LinkTable
from sim.scenarios.mesh_scenarios import run_mesh
from tests.harness.gossip import forged, member_of, said, said_link, statements_for
from tests.harness.wire_strategies import for_class

NAMES = ["a", "b", "c", "d", "e"]
TOP = 2**64 - 1


def member(me: str = "a") -> Membership:
    return Membership(me, [n for n in NAMES if n != me], random.Random(1),
                      statements=statements_for(me, NAMES))


def upd(name: str, inc: int, state: State, source: str) -> MemberUpdate:
    return MemberUpdate(name, inc, int(state), source)


def gossip(*members: Signed, links: tuple[Signed, ...] = ()) -> Gossip:
    return Gossip(members, links)


def link(origin: str, peer: str, version: int, down: bool = False) -> LinkEntry:
    return LinkEntry(origin, peer, version, 20.0, 2.0, 0.5, 1.0 if down else 0.0, down, None)


# --------------------------------------------------------------------------- statements


def test_a_statement_opens_only_as_its_speaker_signed_it() -> None:
    s = statements_for("a", NAMES)
    assert s.open_member(0.0, "b", said(upd("c", 1, State.ALIVE, "c"))) == upd(
        "c", 1, State.ALIVE, "c")
    assert s.open_member(0.0, "b", forged(upd("c", 2, State.ALIVE, "c"), by="b")) is None
    assert s.open_member(0.0, "b", said(upd("c", 1, State.ALIVE, "b"))) is None  # b for c
    assert s.open_member(0.0, "b", said(upd("b", 1, State.DEAD, "b"))) is None  # self-accused
    assert s.open_member(0.0, "b", said(upd("z", 1, State.ALIVE, "z"))) is None  # outsider
    assert s.open_link(0.0, "b", said(upd("c", 1, State.ALIVE, "c"))) is None  # wrong kind
    assert s.open_link(0.0, "b", forged(link("c", "d", 1), by="b")) is None
    assert s.open_link(0.0, "b", said_link(link("c", "d", 1))) == link("c", "d", 1)
    assert s.refused == {"bad_signature": 2, "wrong_speaker": 2, "unknown_speaker": 1,
                         "malformed": 1}


def test_verified_statements_are_cached_and_each_peer_has_a_budget() -> None:
    s = statements_for("a", NAMES)
    s.verify_burst, s.verify_rate = 3, 1.0
    one = said(upd("c", 1, State.ALIVE, "c"))
    assert s.open_member(0.0, "b", one) is not None
    assert s.open_member(0.0, "b", one) is not None and s.verified == 1  # cached: free
    for inc in (2, 3):
        assert s.open_member(0.0, "b", said(upd("c", inc, State.ALIVE, "c"))) is not None
    fourth = said(upd("c", 4, State.ALIVE, "c"))
    assert s.open_member(0.0, "b", fourth) is None and s.refused == {"rate_limited": 1}
    assert s.open_member(0.0, "d", fourth) is not None  # another peer's budget
    assert s.open_member(1.0, "b", said(upd("c", 5, State.ALIVE, "c"))) is not None  # refilled


def test_the_cache_forgets_the_oldest_first() -> None:
    s = statements_for("a", NAMES)
    s.cache_max = 2
    first, second, third = (said(upd("c", i, State.ALIVE, "c")) for i in (1, 2, 3))
    for x in (first, second, third):
        s.open_member(0.0, "b", x)
    assert s.known(first) is None and s.known(third) is not None


def test_a_token_bucket_refills_at_its_rate_up_to_capacity() -> None:
    b = TokenBucket(2, 0.5)
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)
    assert not b.take(1.0) and b.take(2.0)  # 0.5 token after 1 s, 1 after 2 s
    assert b.take(100.0) and b.take(100.0) and not b.take(100.0)  # capped at 2


@given(st.binary(max_size=STATEMENT_MAX + 10))
def test_decode_struct_refuses_any_bytes_with_a_wire_error(data: bytes) -> None:
    for cls in (MemberUpdate, LinkEntry):
        try:
            got = wire.decode_struct(data, cls, STATEMENT_MAX)
        except wire.WireError:
            continue
        assert wire.encode_struct(got) == data  # one value, one encoding


@given(st.one_of(for_class(MemberUpdate), for_class(LinkEntry)))
def test_encode_struct_round_trips(statement: MemberUpdate | LinkEntry) -> None:
    data = wire.encode_struct(statement)
    assert wire.decode_struct(data, type(statement), 4096) == statement


# --------------------------------------------------------------------------- membership


def test_forged_membership_is_refused_and_the_victim_stays_alive() -> None:
    m = member()
    lies = (forged(upd("c", 5, State.DEAD, "d"), by="b"),  # d's accusation, by b
            forged(upd("c", 5, State.LEFT, "c"), by="b"),  # c's own word, by b
            said(upd("c", 5, State.ALIVE, "b")))  # b speaking for c
    m.handle(1.0, Received("b", gossip(*lies)))
    assert m.state_of("c") == State.ALIVE and m.members["c"].incarnation == 0
    assert m.statements.refused == {"bad_signature": 2, "wrong_speaker": 1}


def test_incarnations_cannot_be_pushed_to_the_top() -> None:
    m = member()
    m.handle(1.0, Received("b", gossip(said(upd("c", TOP, State.DEAD, "b")),
                                       said(upd("b", TOP, State.ALIVE, "b")),
                                       said(upd("a", TOP, State.SUSPECT, "b")))))
    assert m.statements.refused == {"out_of_range": 3}
    assert m.state_of("c") == State.ALIVE and m.incarnation == 0
    # an accusation at most ACCUSATION_STEP above: accepted, refuted one higher
    m.handle(2.0, Received("b", gossip(said(upd("a", ACCUSATION_STEP, State.SUSPECT, "b")))))
    assert m.incarnation == ACCUSATION_STEP + 1
    m.handle(3.0, Received("b", gossip(said(upd("a", 2 * ACCUSATION_STEP + 2, State.DEAD,
                                                "b")))))
    assert m.incarnation == ACCUSATION_STEP + 1  # one more than the step: refused
    # a member's own word may step further, but not beyond SELF_STEP or the top
    m.handle(4.0, Received("c", gossip(said(upd("c", SELF_STEP, State.ALIVE, "c")))))
    assert m.members["c"].incarnation == SELF_STEP
    m.handle(5.0, Received("c", gossip(said(upd("c", 2 * SELF_STEP + 1, State.ALIVE, "c")))))
    assert m.members["c"].incarnation == SELF_STEP


def test_a_refutation_at_the_top_of_the_range_still_fits_and_wins() -> None:
    m = member()
    m.incarnation = COUNTER_MAX - 1
    m.handle(1.0, Received("b", gossip(said(upd("a", COUNTER_MAX - 1, State.DEAD, "b")))))
    assert m.incarnation == COUNTER_MAX  # refuted, and still a valid incarnation
    refute = m._own_statement()
    wire.encode(gossip(refute))  # encodes
    other = member("b")
    other.members["a"].incarnation = COUNTER_MAX - 1
    other.handle(2.0, Received("c", gossip(said(upd("a", COUNTER_MAX - 1, State.DEAD, "c")))))
    assert other.state_of("a") == State.DEAD
    other.handle(3.0, Received("a", gossip(refute)))
    assert other.state_of("a") == State.ALIVE  # the accused's word wins
    # no accusation can name COUNTER_MAX: its refutation would not fit
    other.handle(4.0, Received("c", gossip(said(upd("a", COUNTER_MAX, State.DEAD, "c")))))
    assert other.state_of("a") == State.ALIVE


def test_a_restarted_member_takes_up_its_own_word_and_refutes_its_death() -> None:
    """Others hold a at incarnation 40 and dead; a restarts at 0 (its incarnation is not
    stored). A sync brings its own signed statement at 40 back, then the death: a
    continues above 40 and refutes."""
    old = said(upd("a", 40, State.ALIVE, "a"))
    death = said(upd("a", 40, State.DEAD, "b"))
    m = member()
    m.handle(1.0, Received("b", Sync(False, (death,), (), ())))
    assert m.incarnation == 0  # 40 is beyond ACCUSATION_STEP of what a knows: refused
    m.handle(2.0, Received("b", Sync(False, (old, death), (), ())))
    assert m.incarnation == 41


def test_a_death_heard_in_a_sync_is_a_suspicion_by_its_signer_not_gossiped() -> None:
    m = member()
    m.handle(1.0, Received("b", Sync(False, (said(upd("c", 0, State.DEAD, "d")),), (), ())))
    assert m.state_of("c") == State.SUSPECT and m.members["c"].confirmations == ["d"]
    members, _ = m.queue.take(16, 12)
    assert all(member_of(s).name != "c" for s in members)


def test_sync_requests_are_answered_within_a_budget() -> None:
    m = member()
    replies = 0
    for i in range(SYNC_REPLY_BURST + 3):
        out = m.handle(1.0 + i * 0.01, Received("b", Sync(True, (), (), ())))
        replies += sum(1 for a in out if isinstance(a, Send) and isinstance(a.message, Sync))
    assert replies == SYNC_REPLY_BURST and m.statements.refused == {"rate_limited": 3}
    out = m.handle(30.0, Received("b", Sync(True, (), (), ())))
    assert any(isinstance(a, Send) and isinstance(a.message, Sync) for a in out)


# --------------------------------------------------------------------------- link entries


def test_link_entries_only_from_their_origin_and_in_range() -> None:
    t = LinkTable("a", NAMES, statements_for("a", NAMES))
    lies = [forged(link("c", "d", 5, down=True), by="b"),  # a link b is not on
            said_link(link("b", "c", TOP)),  # b's own link, at the top
            said_link(link("b", "c", SELF_STEP + 1))]  # a step too far from nothing
    assert t.open(0.0, "b", lies) == []
    assert t.statements.refused == {"bad_signature": 1, "out_of_range": 2}
    honest = said_link(link("b", "c", 7))
    assert t.merge(0.0, t.open(0.0, "b", [honest])) == [(link("b", "c", 7), honest)]
    assert t.entries_newer_than(()) == [honest]  # passed on as b signed it


def test_a_link_entry_is_not_sent_to_a_peer_that_holds_it() -> None:
    q = TransmitQueue()
    entry = said_link(link("b", "c", 1))
    q.put(("l", "b", "c"), entry, holder="b")  # b sent it to us
    assert q.take(16, 12, to="b", everyone=3) == ([], [])
    assert q.take(16, 12, to="c", everyone=3) == ([], [entry])
    assert q.take(16, 12, to="c", everyone=3) == ([], [])  # c has it now
    q.held_by(("l", "b", "c"), entry, "d", everyone=3)  # the last peer: nobody lacks it
    assert len(q) == 0
    with pytest.raises(ValueError, match="'m' or 'l'"):
        q.put(("x",), entry)


# --------------------------------------------------------------------------- simulator


def test_byzantine_gossip_is_refused_and_counted_and_the_victim_lives() -> None:
    r = run_mesh("byzantine-gossip", 3, 6, faults_until=70.0)
    assert r.ok, r.violations
    m = r.metrics
    assert m["gossip_refused"].keys() == {"bad_signature", "out_of_range"}
    # every lie that arrived was refused (the geo matrix loses 1 % of frames)
    assert m["lies_sent"] * 0.95 <= m["gossip_refused_total"] <= m["lies_sent"]
    assert m["false_positives"] == 0


def test_a_node_remembers_statements_in_proportion_to_its_federation() -> None:
    # a 4-DC node kept 16,384 (the 64-DC size) and filled it in 70 minutes of soak
    assert [statement_cache_size(n) for n in (1, 4, 16, 32, 64, 200)] == [
        1024, 1024, 1024, 4096, CACHE_MAX, CACHE_MAX]
